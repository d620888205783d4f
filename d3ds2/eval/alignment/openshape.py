"""OpenShape's PointBERT-style point encoder aligned with OpenCLIP ViT-bigG-14 (the paper's "openshape" metric).

Facts used (read, not copied; the code here is our own):

- Architecture, Colin97/OpenShape_code ``src/models/ppat.py`` (``PointPatchTransformer`` + ``Projected``) and
  ``src/models/pointnet_util.py`` (``PointNetSetAbstraction``, ``query_ball_point``, ``sample_and_group``):
  a PointNet set abstraction cuts the cloud into ``patches`` balls (farthest-point centres, ball query of
  ``radius`` keeping ``nsample`` points) and embeds each with a shared 1x1-conv MLP ``[64, 64, sa_dim]`` (conv,
  BatchNorm, ReLU) over ``[xyz - centre, features]`` followed by a max over the ball; ``lift`` = 1x1 Conv1d over
  ``[centre xyz, patch feature]`` to ``dim`` then LayerNorm; a learned CLS token (shape ``[dim]``) is prepended
  (no positional embedding: ``rel_pe`` is off by default, so the centroid deltas are unused); ``depth`` pre-norm
  blocks (attention: bias-free ``to_qkv``, ``heads`` x 64, scale ``dim_head ** -0.5``, ``to_out`` Linear;
  feed-forward: Linear, exact GELU, Linear); the CLS output goes through ``proj`` = Linear(dim, 1280).
  There is no final LayerNorm.
- Released configuration: the README of Colin97/OpenShape_code trains ``pointbert_all`` with ``model.scaling=4``,
  ``in_channel: 6`` and ``clip_embed_dim: 1280`` (``src/configs/train.yaml``); ``ppat.make`` scaling 4 =
  ``PointPatchTransformer(512, 12, 8, 512*3, 256, 384, 0.2, 64, 6)`` + ``Linear(512, 1280)``. The demo's loader
  (HF space OpenShape/openshape-demo, mirrored in camenduru/openshape-demo-hf and
  Hyper-Devil/openshape-demo-support ``openshape/__init__.py``, ``G14``) builds exactly this for
  ``openshape-pointbert-vitg14-rgb``.
- Checkpoint: ``model.pt`` of Hugging Face ``OpenShape/openshape-pointbert-vitg14-rgb``, written by
  ``Trainer.save_model`` (``src/train.py``): a dict with ``state_dict`` (the DistributedDataParallel model:
  every key starts with ``module.``, then ``ppat.`` or ``proj.``), ``logit_scale``, ``text_proj`` / ``image_proj``
  (None: ``use_image_proj: False``), ``optimizer``, ``scheduler``, ``epoch``, ``step`` and ``best_*`` metrics.
  The demo loads it as ``{k minus 'module.': v for k in s['state_dict']}`` into the model above. BatchNorm was
  converted to SyncBatchNorm for training: same keys (weight, bias, running_mean, running_var,
  num_batches_tracked).
- Input (``src/data.py``, ``src/example.py``, the demo's ``app.py`` / ``classification.py``): 10,000 surface
  points; the raw clouds are Y-up (``y_up: True``) and y/z are swapped (``xyz[:, [1, 2]] = xyz[:, [2, 1]]``) so
  that the encoder sees Z-up ("gravity-axis z" in the README); ``normalize_pc`` centres on the mean and divides by
  the largest norm (= :func:`~d3ds2.eval.alignment.points.normalise_unit_sphere`); features = ``[xyz, rgb]``
  with rgb in [0, 1] (6 channels: the normalised xyz again plus colour), so the set abstraction's first conv
  reads 3 + 6 = 9 channels. Shapes without colour get rgb 0.4 in training (``rgb_random_drop_prob``) and the
  ModelNet40 test ("scale to 0.4 to make it consistent with the training data").
- FPS is ``dgl.geometry.farthest_point_sampler`` (a random start point, DGL docs); here the shared
  :func:`~d3ds2.eval.alignment.points.farthest_point_sample` starts at index 0, which is a uniformly random point
  for i.i.d. surface samples and makes the metric deterministic. The ball query keeps, per centre, the
  ``nsample`` in-radius points of LOWEST INDEX (not the nearest: the reference sorts indices), padding with the
  first one; it lives here (:func:`ball_query`) because the shared kNN patches do not fit it.
- Image side: the shape embedding was trained against OpenCLIP ViT-bigG-14 ``laion2b_s39b_b160k``
  ``encode_image`` features (README "All image and text features are extracted using OpenCLIP (ViT-bigG-14,
  laion2b_s39b_b160k)"), used without an image projection and compared by cosine similarity
  (``contras_loss`` normalises both sides), so the unit-norm ``image_embeds`` of the transformers port
  ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` (:class:`ClipImageTower`) is the matching embedding.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AlignmentModel
from ...checkpoint import load_checkpoint
from .layers import Block
from .points import farthest_point_sample, gather, normalise_unit_sphere

HF_REPO = "OpenShape/openshape-pointbert-vitg14-rgb"
HF_FILE = "model.pt"


@dataclass(frozen=True)
class OpenShapeConfig:
    dim: int = 512
    depth: int = 12
    heads: int = 8
    dim_head: int = 64
    mlp_dim: int = 1536
    sa_dim: int = 256
    n_patches: int = 384
    radius: float = 0.2
    n_samples: int = 64
    in_dim: int = 6  # per-point features: normalised xyz + rgb
    embed_dim: int = 1280  # OpenCLIP ViT-bigG-14 embedding width


# The released openshape-pointbert-vitg14-rgb: ppat.make scaling 4 + Linear(512, 1280).
OPENSHAPE_G14 = OpenShapeConfig()
# Tiny random config for tests.
OPENSHAPE_TINY = OpenShapeConfig(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=48, sa_dim=24, n_patches=16,
                                 radius=0.4, n_samples=8, embed_dim=24)


def ball_query(xyz: torch.Tensor, centers: torch.Tensor, radius: float, k: int) -> torch.Tensor:
    """Indices long [B, S, k] into xyz [B, N, 3]: per centre [B, S, 3], the k lowest-index points within
    ``radius`` (squared distance <= radius**2) in increasing index order, padded with the first of them when
    fewer are in range (OpenShape's ``query_ball_point``). Every centre must be within ``radius`` of some point
    (true for FPS centres, which are points of the cloud)."""
    n = xyz.shape[1]
    if k > n:
        raise ValueError(f"ball_query: {k} samples per ball requested from {n} points")
    d2 = torch.cdist(centers, xyz, compute_mode="donot_use_mm_for_euclid_dist").square()
    idx = torch.arange(n, device=xyz.device).expand_as(d2).masked_fill(d2 > radius ** 2, n)
    idx = idx.topk(k, dim=-1, largest=False, sorted=True).values
    return torch.where(idx == n, idx[..., :1], idx)


class SetAbstraction(nn.Module):
    """FPS centres + ball-query groups + shared PointNet MLP (1x1 conv, BatchNorm, ReLU) + max over the ball."""

    def __init__(self, cfg: OpenShapeConfig) -> None:
        super().__init__()
        self.n_patches, self.radius, self.n_samples = cfg.n_patches, cfg.radius, cfg.n_samples
        widths = [3 + cfg.in_dim, 64, 64, cfg.sa_dim]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])

    def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xyz [B, N, 3], features [B, N, C] -> (centres [B, S, 3], patch features [B, S, sa_dim])."""
        centers = gather(xyz, farthest_point_sample(xyz, self.n_patches))
        group = ball_query(xyz, centers, self.radius, self.n_samples)
        x = torch.cat([gather(xyz, group) - centers[:, :, None], gather(features, group)], -1)  # [B, S, K, 3+C]
        x = x.permute(0, 3, 1, 2)  # [B, 3+C, S, K]
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return centers, x.amax(-1).transpose(1, 2)


class OpenShapePointEncoder(nn.Module):
    """PointPatchTransformer + projection. forward(xyz [B, N, 3], features [B, N, in_dim]) -> [B, embed_dim]
    (not normalised); inputs already preprocessed (see :meth:`OpenShapeAlignment.preprocess`)."""

    def __init__(self, cfg: OpenShapeConfig = OPENSHAPE_G14) -> None:
        super().__init__()
        self.cfg = cfg
        self.sa = SetAbstraction(cfg)
        self.lift_conv = nn.Conv1d(cfg.sa_dim + 3, cfg.dim, 1)
        self.lift_norm = nn.LayerNorm(cfg.dim)
        self.cls_token = nn.Parameter(torch.randn(cfg.dim))
        if cfg.heads * cfg.dim_head != cfg.dim:
            raise ValueError(f"OpenShapeConfig: heads x dim_head ({cfg.heads} x {cfg.dim_head}) must equal dim "
                             f"{cfg.dim}")
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_dim, qv_bias=False, eps=1e-5)
                                    for _ in range(cfg.depth))
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim)

    def forward(self, xyz: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        centers, feat = self.sa(xyz, features)
        x = self.lift_conv(torch.cat([centers, feat], -1).transpose(1, 2)).transpose(1, 2)
        x = self.lift_norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.proj(x[:, 0])


# Official key (after 'module.') -> ours; applied in order, each key must match exactly one pattern.
_RENAMES = [
    (r"^ppat\.sa\.mlp_convs\.(\d+)\.", r"sa.convs.\1."),
    (r"^ppat\.sa\.mlp_bns\.(\d+)\.", r"sa.norms.\1."),
    (r"^ppat\.lift\.0\.", "lift_conv."),
    (r"^ppat\.lift\.2\.", "lift_norm."),
    (r"^ppat\.cls_token$", "cls_token"),
    (r"^ppat\.transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
    (r"^ppat\.transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.", r"blocks.\1.attn.qkv."),
    (r"^ppat\.transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"^ppat\.transformer\.layers\.(\d+)\.1\.norm\.", r"blocks.\1.norm2."),
    (r"^ppat\.transformer\.layers\.(\d+)\.1\.fn\.net\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^ppat\.transformer\.layers\.(\d+)\.1\.fn\.net\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^proj\.", "proj."),
]


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def openshape_state_dict(official: dict, cfg: OpenShapeConfig = OPENSHAPE_G14) -> dict[str, torch.Tensor]:
    """OpenShape's ``model.pt`` (the whole checkpoint dict or its ``state_dict``) -> a state dict of
    :class:`OpenShapePointEncoder` (``cfg``): drops the DistributedDataParallel ``module.`` prefix and renames
    (``_RENAMES``). Raises ValueError naming missing / unexpected keys and shape mismatches."""
    sd = official.get("state_dict", official) if isinstance(official, dict) else official
    if not isinstance(sd, dict):
        raise ValueError(f"openshape_state_dict: expected a dict of tensors, got {type(sd).__name__}")
    out, unexpected = {}, []
    for key, value in sd.items():
        k = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in _RENAMES:
            if re.match(pattern, k):
                out[re.sub(pattern, repl, k)] = value
                break
        else:
            unexpected.append(key)
    with torch.device("meta"):
        expected = OpenShapePointEncoder(cfg).state_dict()
    unexpected += [k for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    shapes = [f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in out and tuple(out[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError("openshape_state_dict: the checkpoint does not fit OpenShapePointEncoder("
                         f"{asdict(cfg)}). Missing (ours): [{_short(missing)}]; unexpected (checkpoint / "
                         f"renamed): [{_short(unexpected)}]; shape mismatches (checkpoint vs ours): "
                         f"[{_short(shapes)}]")
    return {k: out[k] for k in expected}


class OpenShapeAlignment(AlignmentModel):
    """OpenShape openshape-pointbert-vitg14-rgb + the OpenCLIP ViT-bigG-14 image tower.

    ``encode_points(points [B, N, 6])``: xyz in the mesh frame (Y up when ``y_up``, as the glTF / Objaverse
    meshes OpenShape was trained on; the encoder gets y and z swapped), rgb in [0, 1]. Give ``n_points`` =
    10,000 surface samples per shape as in training: the ball query (radius 0.2, 64 points) depends on density.
    """

    name = "openshape"
    n_points = 10_000

    def __init__(self, encoder: OpenShapePointEncoder, image_tower: nn.Module, y_up: bool = True) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_tower = image_tower
        self.y_up = y_up

    def preprocess(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [B, N, 6] -> (xyz [B, N, 3] Z-up in the unit sphere, features [B, N, 6] = xyz + rgb)."""
        xyz = points[..., :3]
        if self.y_up:
            xyz = xyz[..., [0, 2, 1]]
        xyz = normalise_unit_sphere(xyz) if self.normalise else xyz
        return xyz, torch.cat([xyz, points[..., 3:6]], -1)

    @torch.no_grad()
    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != 6:
            raise ValueError(f"OpenShapeAlignment.encode_points: expected [B, N, 6] xyz+rgb, got "
                             f"{tuple(points.shape)}")
        p = next(self.encoder.parameters())
        xyz, features = self.preprocess(points.to(p.device, p.dtype))
        return F.normalize(self.encoder(xyz, features), dim=-1)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, image_tower: nn.Module | str | None = None,
                        cfg: OpenShapeConfig = OPENSHAPE_G14, trust_pickle: bool = False, y_up: bool = True
                        ) -> "OpenShapeAlignment":
        """Load OpenShape's released ``model.pt`` (Hugging Face ``OpenShape/openshape-pointbert-vitg14-rgb``).

        ``image_tower``: a module, a transformers CLIP source for :class:`ClipImageTower` or None for
        ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``. ``trust_pickle=True`` unpickles arbitrary objects (only
        for a file you trust) in case the optimizer / scheduler entries hold types the safe loader refuses.
        """
        fix = (f"download {HF_FILE} of the Hugging Face model {HF_REPO} (e.g. huggingface_hub.hf_hub_download("
               f"'{HF_REPO}', '{HF_FILE}'); it may need a logged-in token) and pass its path")
        ckpt = load_checkpoint(path, "OpenShapeAlignment", f"{HF_REPO}/{HF_FILE}", trust_pickle)
        try:
            sd = openshape_state_dict(ckpt, cfg)
        except ValueError as e:
            raise ValueError(f"OpenShapeAlignment: {path!r} is not the OpenShape PointBERT ViT-bigG-14 "
                             f"checkpoint ({e}); {fix}") from e
        encoder = OpenShapePointEncoder(cfg)
        encoder.load_state_dict(sd)
        if image_tower is None or isinstance(image_tower, str):
            from .image_tower import BIGG_14, ClipImageTower

            image_tower = ClipImageTower(image_tower or BIGG_14)
        return cls(encoder, image_tower, y_up=y_up)
