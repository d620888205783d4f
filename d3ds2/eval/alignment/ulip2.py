"""ULIP-2 shape-image alignment: the coloured 10k-point PointBERT encoder and the OpenCLIP ViT-bigG-14 image
tower it was aligned with (the paper's "ULIP-2" metric column).

Facts used (salesforce/ULIP; the code here is our own):

* Released checkpoint: ``ULIP-2-PointBERT-10k-colored-pc-pretrained.pt`` (README, "06/17/2024": the CVPR 2024
  ensembled model on 10k xyzrgb points), GCS bucket ``sfr-ulip-code-release-research`` at
  ``ULIP-2/models/ULIP-2-PointBERT-10k-colored-pc-pretrained.pt``; re-uploaded to the Hugging Face *dataset*
  repository ``SFXX/ulip`` (README news), same path. It is a ``torch.save`` dict whose ``'state_dict'`` holds the
  DDP-wrapped ``ULIP2_WITH_OPENCLIP`` parameters with a ``module.`` prefix (main.py ``test_zeroshot_3d_ulip2``
  strips ``module.`` and loads with ``strict=False``). The older xyz-only ``pointbert_ULIP-2.pt`` (README,
  "06/09/2023") is a different, 3-channel model and is rejected by :func:`ulip2_state_dict`.
* Model (models/ULIP_models.py ``ULIP2_PointBERT_Colored`` / ``ULIP2_WITH_OPENCLIP``): ``point_encoder`` =
  ``PointTransformer_Colored``, ``pc_projection`` [768, 1280] (``encode_pc = point_encoder(pc) @
  pc_projection``), ``logit_scale``, and the OpenCLIP model ``open_clip_model`` =
  ``open_clip.create_model_and_transforms('ViT-bigG-14', pretrained='laion2b_s39b_b160k')`` whose
  ``encode_image`` is the image embedding (1280-d). The same weights in transformers format:
  ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` (:data:`~d3ds2.eval.alignment.image_tower.BIGG_14`).
* Hyperparameters (models/pointbert/ULIP_2_PointBERT_10k_colored_pointclouds.yaml): trans_dim 384, depth 18,
  num_heads 6, group_size 32, num_group 512, encoder_dims 256, npoints 10000.
* Point encoder (models/pointbert/point_encoder.py ``PointTransformer_Colored``, models/pointbert/dvae.py
  ``Group``/``Encoder``): FPS centres + kNN groups with xyz relative to the centre and rgb untouched; mini-PointNet
  ``Encoder(input_dim=6)``: first_conv = Conv1d(6,128)-BN-ReLU-Conv1d(128,256), max over the group, concat
  [global, local] -> second_conv = Conv1d(512,512)-BN-ReLU-Conv1d(512,256), max; ``reduce_dim`` Linear(256,384);
  ``cls_token``/``cls_pos`` [1,1,384]; ``pos_embed`` = Linear(3,128)-GELU-Linear(128,384) on the centres;
  ``blocks.blocks[i]``: pre-norm ViT block (LayerNorm, attention with ``qkv`` Linear without bias + ``proj``,
  LayerNorm, Mlp fc1-GELU-fc2, ratio 4), the positional embedding is added to the input of *every* block; final
  ``norm``; feature = concat(cls token, max over the group tokens) = 768-d.
* FPS (models/pointbert/misc.py ``fps``): pointnet2_ops ``furthest_point_sample`` — starts at index 0 and skips
  points with squared norm <= 1e-3 (never selected, pointnet2_ops sampling_gpu.cu): the shared
  :func:`~d3ds2.eval.alignment.points.farthest_point_sample` with ``POINTNET2_SKIP_SQ_NORM``.
* kNN (dvae.py ``knn_point``): squared distances, ``topk(largest=False)``; the centre itself is in its group.
* Preprocessing (data/dataset_3d.py ``Objaverse_Lvis_Colored``, the ULIP-2 LVIS evaluation): ``pc_norm`` on
  xyz only (centre on the centroid, divide by the largest norm), rgb appended unchanged, no axis swap, 10k
  points. The LVIS clouds are OpenShape's Objaverse ``.npy`` files (rgb in [0, 1]; stored y-up as the glTF
  assets: OpenShape's own loader swaps y/z for its encoder, Colin97/OpenShape_code src/data.py, ULIP-2 does
  not). So :class:`ULIP2Alignment` expects xyz in the y-up glTF frame (a GLB as trimesh loads it) and rgb in
  [0, 1]; it applies no axis change.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AlignmentModel
from ...checkpoint import load_checkpoint
from .checkpoint import check_state_dict_keys
from .layers import Block, MiniPointNet
from .points import POINTNET2_SKIP_SQ_NORM, knn_patches, normalise_unit_sphere

CHECKPOINT_NAME = "ULIP-2-PointBERT-10k-colored-pc-pretrained.pt"
CHECKPOINT_SOURCES = (
    "gs://sfr-ulip-code-release-research/ULIP-2/models/" + CHECKPOINT_NAME,
    "https://huggingface.co/datasets/SFXX/ulip (file ULIP-2/models/" + CHECKPOINT_NAME + ")",
)

# the released checkpoint's hyperparameters (ULIP_2_PointBERT_10k_colored_pointclouds.yaml; pointnet_widths,
# pos_hidden and mlp_ratio are hard-coded in dvae.py Encoder / point_encoder.py; embed_dim = OpenCLIP
# ViT-bigG-14's embedding width, the pc_projection's output)
ULIP2_POINTBERT = dict(in_channels=6, trans_dim=384, depth=18, num_heads=6, mlp_ratio=4, num_group=512,
                       group_size=32, encoder_dims=256, pointnet_widths=(128, 256, 512), pos_hidden=128,
                       embed_dim=1280, n_points=10_000)
# a tiny random encoder for tests
ULIP2_TINY = dict(in_channels=6, trans_dim=32, depth=2, num_heads=4, mlp_ratio=4, num_group=16, group_size=8,
                  encoder_dims=24, pointnet_widths=(16, 24, 40), pos_hidden=20, embed_dim=16, n_points=256)


# ------------------------------------------------------------------------------------------------
# modules (attribute names follow the official ones so the checkpoint loads with prefix handling only)
class TransformerEncoder(nn.Module):
    """Blocks with the positional embedding added to every block's input."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, int(dim * mlp_ratio), qv_bias=False, eps=1e-5)
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBERT(nn.Module):
    """Coloured PointBERT: points [B, N, in_channels] (already normalised) -> [B, 2 * trans_dim]
    (cls token concatenated with the max over the group tokens, after the final LayerNorm)."""

    def __init__(self, in_channels: int, trans_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 num_group: int, group_size: int, encoder_dims: int, pointnet_widths: tuple[int, int, int],
                 pos_hidden: int) -> None:
        super().__init__()
        self.num_group, self.group_size = num_group, group_size
        self.encoder = MiniPointNet(in_channels, tuple(pointnet_widths), encoder_dims)
        self.reduce_dim = nn.Linear(encoder_dims, trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, pos_hidden), nn.GELU(), nn.Linear(pos_hidden, trans_dim))
        self.blocks = TransformerEncoder(trans_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(trans_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        groups, centers = knn_patches(points, self.num_group, self.group_size, POINTNET2_SKIP_SQ_NORM)
        tokens = self.reduce_dim(self.encoder(groups))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centers)], 1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(1)], -1)


class ULIP2PointEncoder(nn.Module):
    """``point_encoder`` + ``pc_projection``: normalised points [B, N, 6] -> embeddings [B, embed_dim]
    (not unit-norm; ``encode_pc`` of the official model)."""

    def __init__(self, config: dict = ULIP2_POINTBERT) -> None:
        super().__init__()
        c = dict(config)
        self.point_encoder = PointBERT(c["in_channels"], c["trans_dim"], c["depth"], c["num_heads"], c["mlp_ratio"],
                                       c["num_group"], c["group_size"], c["encoder_dims"], c["pointnet_widths"],
                                       c["pos_hidden"])
        self.pc_projection = nn.Parameter(torch.randn(2 * c["trans_dim"], c["embed_dim"])
                                          * (2 * c["trans_dim"]) ** -0.5)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(points) @ self.pc_projection


# ------------------------------------------------------------------------------------------------
# checkpoint
IGNORED_PREFIXES = ("open_clip_model.", "logit_scale")  # the image/text tower (loaded separately) and the temperature


def ulip2_state_dict(official: dict, expected: dict | None = None) -> dict:
    """The official ``ULIP2_WITH_OPENCLIP`` state dict (``ckpt['state_dict']``) -> :class:`ULIP2PointEncoder`'s.

    Strips ``module.`` (DDP), drops ``open_clip_model.*`` and ``logit_scale``; every other key keeps its name
    (``point_encoder.*``, ``pc_projection``). With ``expected`` (our ``state_dict()``), raises ``KeyError``
    naming the missing / unexpected keys and ``ValueError`` naming shape mismatches.
    """
    out = {}
    for key, value in official.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(IGNORED_PREFIXES):
            continue
        out[k] = value
    if expected is not None:
        hint = f"the ULIP-2 coloured PointBERT, {CHECKPOINT_NAME}"
        if "point_encoder.encoder.first_conv.0.weight" in out and tuple(
                out["point_encoder.encoder.first_conv.0.weight"].shape[1:2]) == (3,):
            hint += "; a 3-channel first conv is the xyz-only pointbert_ULIP-2.pt"
        check_state_dict_keys("ulip2_state_dict", out, {k: tuple(v.shape) for k, v in expected.items()}, hint)
    return out


def load_ulip2_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """The state dict stored in an official ULIP-2 checkpoint file (``ckpt['state_dict']``, or the dict itself
    when it holds tensors directly). Loads with ``weights_only=True``, allowing ``argparse.Namespace`` (the
    training script saves ``args``); ``trust_pickle=True`` falls back to a full unpickle (trusted files only)."""
    ckpt = load_checkpoint(path, "ULIP-2", f"{CHECKPOINT_NAME} from {' or '.join(CHECKPOINT_SOURCES)}",
                                trust_pickle, safe_globals=(argparse.Namespace,))
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"ULIP-2 checkpoint {str(path)!r} holds no state dict (expected a dict with 'state_dict', "
                         f"as {CHECKPOINT_NAME})")
    return state


# ------------------------------------------------------------------------------------------------
# alignment model
class ULIP2Alignment(AlignmentModel):
    """ULIP-2 (coloured 10k-point PointBERT) + OpenCLIP ViT-bigG-14 (laion2b_s39b_b160k) image tower.

    encode_points(points [B, N, 6]: xyz in the y-up glTF frame, rgb in [0, 1]) normalises each cloud's xyz to
    the unit sphere (centroid, max norm) as the official evaluation does and returns unit-norm [B, 1280].
    """

    name = "ulip2"

    def __init__(self, image_tower: nn.Module | str | None = None, config: dict = ULIP2_POINTBERT) -> None:
        super().__init__()
        self.config = dict(config)
        self.n_points = self.config["n_points"]
        self.encoder = ULIP2PointEncoder(self.config)
        if image_tower is None or isinstance(image_tower, str):
            from .image_tower import BIGG_14, ClipImageTower

            image_tower = ClipImageTower(image_tower or BIGG_14)
        proj = getattr(getattr(getattr(image_tower, "model", None), "config", None), "projection_dim", None)
        if proj is not None and proj != self.config["embed_dim"]:
            raise ValueError(f"ULIP2Alignment: the image tower embeds to {proj} dims, the point encoder to "
                             f"{self.config['embed_dim']}: ULIP-2 needs OpenCLIP ViT-bigG-14 (1280)")
        self.image_tower = image_tower
        self.requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, image_tower: nn.Module | str | None = None,
                        config: dict = ULIP2_POINTBERT, trust_pickle: bool = False) -> "ULIP2Alignment":
        """Load the official ``ULIP-2-PointBERT-10k-colored-pc-pretrained.pt`` (see module docstring);
        ``image_tower``: a module, a transformers CLIP source for :class:`ClipImageTower`, or None for
        ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``."""
        state = load_ulip2_checkpoint(path, trust_pickle=trust_pickle)
        model = cls(image_tower=image_tower, config=config)
        try:
            mapped = ulip2_state_dict(state, model.encoder.state_dict())
        except (KeyError, ValueError) as e:
            raise type(e)(f"{path}: {e.args[0]}") from e
        model.encoder.load_state_dict(mapped, strict=True)
        return model

    def preprocess_points(self, points: torch.Tensor) -> torch.Tensor:
        """[B, N, 6] -> xyz centred on the centroid and scaled to max norm 1 (``pc_norm``; kept as given when
        ``normalise`` is off), rgb unchanged."""
        p = points.to(self.encoder.pc_projection.device, self.encoder.pc_projection.dtype)
        xyz = normalise_unit_sphere(p[..., :3]) if self.normalise else p[..., :3]
        return torch.cat([xyz, p[..., 3:]], -1)

    @torch.no_grad()
    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != self.config["in_channels"]:
            raise ValueError(f"ULIP2Alignment.encode_points: expected [B, N, {self.config['in_channels']}] "
                             f"(xyz + rgb), got {tuple(points.shape)}")
        emb = self.encoder(self.preprocess_points(points))
        return F.normalize(emb.to(torch.promote_types(emb.dtype, torch.float32)), dim=-1)  # >= float32
