"""Uni3D point encoder (the paper's "Uni3D" image-to-3D metric) with the EVA02-E-14-plus image tower.

Written from the facts of the official repository baaivision/Uni3D (no code taken):

* models/point_encoder.py ``PointcloudEncoder``: ``Group`` cuts ``num_group`` farthest-point-sampled centers
  (pointnet2_ops ``furthest_point_sample``) with their ``group_size`` nearest neighbours (squared-distance
  top-k); patch features = (xyz - center, rgb). ``Encoder`` (mini PointNet): ``first_conv`` = Conv1d(6, 128),
  BatchNorm1d(128), ReLU, Conv1d(128, 256); max over the patch, concatenated with the per-point features
  (global first) -> ``second_conv`` = Conv1d(512, 512), BatchNorm1d(512), ReLU, Conv1d(512, encoder_dim);
  max over the patch. Then ``encoder2trans`` Linear(encoder_dim, trans_dim); tokens = [``cls_token``, patches]
  + [``cls_pos``, ``pos_embed``(center)] with ``pos_embed`` = Linear(3, 128), GELU, Linear(128, trans_dim);
  the timm model's ``blocks`` (called as ``blk(x)``: no rotary embedding), ``norm`` then ``fc_norm`` on the
  class token, ``trans2embed`` Linear(trans_dim, embed_dim). Patch dropout is 0 at evaluation.
* models/uni3d.py: ``Uni3D`` holds ``logit_scale`` and ``point_encoder``; ``point_encoder.visual`` is the whole
  ``timm.create_model(pc_model)``, so the checkpoint also carries the timm model's unused ``patch_embed``,
  ``pos_embed``, ``cls_token`` and classifier ``head`` (1000 classes: the ``*_in1k`` pretrained configs).
  ``encode_pc`` splits [B, N, 6] into xyz and rgb.
* main.py ``test_zeroshot_3d``: ``torch.load(ckpt)['module']``, a leading ``module.`` stripped, strict load;
  embeddings are L2-normalised before the cosine similarity.
* scripts/inference.sh + utils/params.py: ``--npoints 10000 --num-group 512 --group-size 64 --pc-encoder-dim 512
  --embed-dim 1024``, clip model ``EVA02-E-14-plus`` / ``laion2b_s9b_b144k``; giant: ``pc_model =
  eva_giant_patch14_560.m30m_ft_in22k_in1k``, pc_feat_dim 1408; large: ``eva02_large_patch14_448
  .mim_m38m_ft_in22k_in1k``, 1024; base: ``eva02_base_patch14_448.mim_in22k_ft_in22k_in1k``, 768. (The script
  passes ``--pc-feat-dim 1408`` for every scale, a bug that only the giant survives; the trans_dim of the
  large/base checkpoints must be the timm model's width.) ``--openshape_setting`` is not set.
* README: checkpoints ``modelzoo/uni3d-{b,l,g}[-no-lvis]/model.pt`` of the Hugging Face repo ``BAAI/Uni3D``
  (the best, "uni3d-g", is ``modelzoo/uni3d-g/model.pt``).
* data/datasets.py (evaluation sets, ``openshape_setting`` off): xyz as stored (OpenShape's Objaverse frame,
  y up: the training augmentation ``rotate_point_cloud`` turns about y), ``pc_norm`` = centre on the centroid,
  divide by the largest norm; rgb in [0, 1]; clouds without colour get 0.4 grey (ScanObjectNN, and half of the
  training samples); all 10 000 points are fed.
* timm ``eva_giant_patch14_560`` (timm/models/eva.py; timm 0.9.7 per the README): width 1408, depth 40, 16 heads,
  mlp hidden 6144 (GELU), fused qkv with ``q_bias``/``v_bias``, pre-norm, no layer scale, ``global_pool='avg'``
  -> ``norm`` Identity and ``fc_norm`` LayerNorm(eps 1e-6). ``eva02_large_patch14_448``: width 1024, depth 24,
  16 heads, separate q/k/v projections, SwiGLU hidden int(1024 * 8/3) = 2730 with sub-LN, rotary embedding in
  timm (unused here: the blocks are called without it).
* pointnet2_ops (erikwijmans/Pointnet2_PyTorch, sampling_gpu.cu): FPS starts at index 0, and points with
  |p|^2 <= 1e-3 are never selected after it (``if (mag <= 1e-3) continue;``): the shared
  :func:`~d3ds2.eval.alignment.points.farthest_point_sample` with ``POINTNET2_SKIP_SQ_NORM``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AlignmentModel
from ...checkpoint import load_checkpoint
from .checkpoint import check_state_dict_keys, load_into
from .eva_clip import EvaClipImageTower
from .layers import LN_EPS, Block, MiniPointNet
from .points import POINTNET2_SKIP_SQ_NORM, knn_patches, normalise_unit_sphere

UNI3D_HUB = "BAAI/Uni3D"
UNI3D_G_FILE = "modelzoo/uni3d-g/model.pt"


@dataclass(frozen=True)
class Uni3DConfig:
    """Uni3D point encoder hyperparameters (see the module docstring for their sources)."""

    trans_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    fused_qkv: bool = True
    swiglu: bool = False
    embed_dim: int = 1024
    encoder_dim: int = 512
    num_group: int = 512
    group_size: int = 64
    n_points: int = 10_000


UNI3D_G = Uni3DConfig()  # eva_giant_patch14_560: the paper-scale Uni3D-g (about 1 B parameters)
UNI3D_L = Uni3DConfig(trans_dim=1024, depth=24, num_heads=16, mlp_hidden=2730, fused_qkv=False,
                      swiglu=True)  # eva02_large_patch14_448
TINY_UNI3D = Uni3DConfig(trans_dim=32, depth=2, num_heads=4, mlp_hidden=48, embed_dim=16, encoder_dim=24,
                         num_group=8, group_size=6, n_points=200)
TINY_UNI3D_SWIGLU = Uni3DConfig(**{**TINY_UNI3D.__dict__, "fused_qkv": False, "swiglu": True})


class Uni3DPointEncoder(nn.Module):
    """Uni3D ``PointcloudEncoder``: points [B, N, 6] (xyz normalised to the unit sphere, rgb in [0, 1]) -> raw
    embeddings [B, embed_dim]. Parameter names are the official ones with ``point_encoder.`` stripped and the
    timm model's ``visual.`` dropped (see :func:`uni3d_state_dict`)."""

    def __init__(self, config: Uni3DConfig = UNI3D_G) -> None:
        super().__init__()
        c = self.config = config
        self.encoder = MiniPointNet(6, (128, 256, 512), c.encoder_dim)
        self.encoder2trans = nn.Linear(c.encoder_dim, c.trans_dim)
        self.trans2embed = nn.Linear(c.trans_dim, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.trans_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, c.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, c.trans_dim))
        self.blocks = nn.ModuleList(Block(c.trans_dim, c.num_heads, c.mlp_hidden, c.fused_qkv, swiglu=c.swiglu)
                                    for _ in range(c.depth))
        self.fc_norm = nn.LayerNorm(c.trans_dim, eps=LN_EPS)

    def group(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [B, N, 6] -> (patches [B, G, K, 6] with xyz relative to the center, centers [B, G, 3])."""
        points = points.to(torch.promote_types(points.dtype, torch.float32))  # geometry in >= float32
        return knn_patches(points, self.config.num_group, self.config.group_size, POINTNET2_SKIP_SQ_NORM)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        patches, centers = self.group(points)
        dtype = self.cls_token.dtype
        tokens = self.encoder2trans(self.encoder(patches.to(dtype)))
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)
        x = x + torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centers.to(dtype))], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.trans2embed(self.fc_norm(x[:, 0]))


_PREFIX = "point_encoder."
_RENAMES = (("visual.blocks.", "blocks."), ("visual.fc_norm.", "fc_norm."))
# Parts of the official model that the point encoder never uses: the contrastive temperature and the timm
# model's image stem / classifier / rotary tables (the last are non-persistent buffers; dropped if present).
_DROPPED = ("visual.patch_embed.", "visual.pos_embed", "visual.cls_token", "visual.head.", "visual.rope.")


def uni3d_state_dict(official: dict, config: Uni3DConfig = UNI3D_G) -> dict:
    """Official Uni3D checkpoint (the file's dict or its ``'module'`` entry) -> :class:`Uni3DPointEncoder`
    state dict.

    Strips ``module.`` and ``point_encoder.``; ``visual.blocks.*`` -> ``blocks.*``, ``visual.fc_norm.*`` ->
    ``fc_norm.*`` (``visual.norm.*`` -> ``fc_norm.*`` when the file has no ``fc_norm``); drops ``logit_scale``,
    the timm model's ``patch_embed``, ``pos_embed``, ``cls_token``, ``head`` (and ``rope`` / ``attn.k_bias``
    buffers if an export kept them). Raises KeyError naming missing /
    unexpected keys and ValueError naming shape mismatches against ``config``. Values pass through unchanged.
    """
    if "module" in official and isinstance(official["module"], dict):
        official = official["module"]
    renames = _RENAMES
    if not any(k.endswith("visual.fc_norm.weight") for k in official):
        # A timm model built with token pooling keeps its final LayerNorm as ``norm`` (``fc_norm`` Identity);
        # PointcloudEncoder applies ``norm`` then ``fc_norm`` to the class token, so either one is our fc_norm.
        renames = renames + (("visual.norm.", "fc_norm."),)
    out = {}
    for k, v in official.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k == "logit_scale":
            continue
        if k.startswith(_PREFIX):
            k = k[len(_PREFIX):]
            if k.startswith(_DROPPED) or k.endswith(".attn.k_bias"):
                continue
            for old, new in renames:
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
        out[k] = v
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Uni3DPointEncoder(config).state_dict().items()}
    check_state_dict_keys("uni3d_state_dict", out, expected,
                          hint=f"a Uni3D checkpoint ({UNI3D_HUB} modelzoo/uni3d-*/model.pt) whose 'module' holds "
                               "'point_encoder.*' keys of the configured scale")
    return out


class Uni3DAlignment(AlignmentModel):
    """Uni3D (metric column ``uni3d``): Uni3D point encoder + OpenCLIP EVA02-E-14-plus image tower.

    ``encode_points(points [B, N, 6])``: xyz in the mesh frame (must be y up, the Objaverse / glTF frame Uni3D's
    data uses; no axis swap is applied, as the official evaluation), rgb in [0, 1] (0.4 grey for uncoloured
    meshes, :data:`~d3ds2.eval.alignment.points.DEFAULT_RGB`); xyz centred on the centroid and scaled to the unit
    sphere (``pc_norm``), encoded, L2-normalised. Uni3D was evaluated with N = 10 000 surface points.
    """

    name = "uni3d"
    n_points = 10_000

    def __init__(self, encoder: Uni3DPointEncoder, image_tower: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.n_points = encoder.config.n_points
        self.image_tower = image_tower

    def encode_images(self, images: list) -> torch.Tensor:
        if self.image_tower is None:
            raise RuntimeError("Uni3DAlignment: no image tower; build it with from_checkpoint(..., "
                               "clip_checkpoint=<open_clip_pytorch_model.bin of the hub repo "
                               "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k>) or image_tower=")
        return super().encode_images(images)

    @torch.no_grad()
    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        device = self.encoder.cls_token.device
        points = points.to(device, torch.float32)
        xyz = normalise_unit_sphere(points[..., :3]) if self.normalise else points[..., :3]
        emb = self.encoder(torch.cat([xyz, points[..., 3:6]], -1))
        return F.normalize(emb.float(), dim=-1)

    @classmethod
    def from_checkpoint(cls, path: str, image_tower: nn.Module | None = None, clip_checkpoint: str | None = None,
                        config: Uni3DConfig = UNI3D_G, dtype: torch.dtype = torch.float32,
                        trust_pickle: bool = False) -> "Uni3DAlignment":
        """Load the official ``model.pt`` (``modelzoo/uni3d-g/model.pt`` of the Hugging Face repo ``BAAI/Uni3D``
        for ``UNI3D_G``, ``modelzoo/uni3d-l/model.pt`` for ``UNI3D_L``): a dict whose ``'module'`` entry is the
        state dict. The image tower is ``image_tower`` if given, else :class:`EvaClipImageTower` loaded from
        ``clip_checkpoint`` (OpenCLIP EVA02-E-14-plus, see :mod:`~d3ds2.eval.alignment.eva_clip`), else none
        (``encode_points`` only). ``trust_pickle=True`` allows unpickling objects beyond tensors, if the file
        holds them (DeepSpeed-style checkpoints may)."""
        sd = load_checkpoint(path, "Uni3DAlignment", f"{UNI3D_HUB} {UNI3D_G_FILE} (or another "
                                  "modelzoo/uni3d-*/model.pt matching `config`)", trust_pickle)
        with torch.device("meta"):
            encoder = Uni3DPointEncoder(config)
        load_into(encoder, uni3d_state_dict(sd, config), dtype)
        if image_tower is None and clip_checkpoint is not None:
            image_tower = EvaClipImageTower.from_checkpoint(clip_checkpoint, dtype=dtype, trust_pickle=trust_pickle)
        return cls(encoder, image_tower)
