"""ULIP-1 PointBERT (xyz only, 8,192 points) with its SLIP ViT-B/16 image tower: the "ULIP" column of the
FlashVDM evaluation protocol (:mod:`d3ds2.eval.protocols`), which differs from ULIP-2 in every part.

Facts used (salesforce/ULIP ``models/ULIP_models.py`` ``ULIP_PointBERT`` / ``ULIP_WITH_IMAGE``,
``models/pointbert/point_encoder.py`` ``PointTransformer``, ``models/pointbert/PointTransformer_8192point.yaml``;
the copy under Tencent-Hunyuan/FlashVDM ``evaluation/ulip/``; no code taken):

* Released checkpoint ``pretrained_models_ckpt_zero-sho_classification_checkpoint_pointbert.pt`` (ULIP-1, the
  file FlashVDM's ``ulip_score.py`` loads): a dict whose ``'state_dict'`` holds the DDP model (``module.``
  prefix), loaded strictly into ``ULIP_PointBERT``: ``point_encoder.*``, ``pc_projection`` [768, 512],
  ``visual.*`` (timm ``vit_base_patch16_224`` with ``num_classes=0``: the SLIP ViT-B/16), ``image_projection``
  [768, 512], the text transformer (``transformer.*``, ``token_embedding``, ``positional_embedding``,
  ``ln_final``, ``text_projection``) and ``logit_scale``.
* Point encoder: ULIP-2's PointBERT with a 3-channel mini-PointNet (``Encoder(encoder_channel)``: first conv
  Conv1d(3, 128)): trans_dim 384, depth 12, 6 heads, 512 groups of 32, encoder_dims 256, 8,192 points; feature
  = concat(cls, max over groups) = 768, ``encode_pc = point_encoder(pc) @ pc_projection``. The encoder does not
  normalise: callers feed what they sampled (FlashVDM: raw ``trimesh.sample.sample_surface`` points).
* Image side: ``encode_image = visual(image) @ image_projection``; timm ViT-B/16 = patch 16, width 768, depth
  12, 12 heads, MLP 3072 (GELU), fused ``qkv`` with bias, pre-norm, LayerNorm eps 1e-6, final ``norm``, class
  token pooled. FlashVDM preprocesses with ``timm.data.create_transform(**resolve_model_data_config(visual))``:
  for ``vit_base_patch16_224`` (augreg weights config) mean = std = 0.5, bicubic, crop_pct 0.9 (shorter side
  to 248, centre crop 224), after ``Image.open(...).convert('RGB')``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from ...checkpoint import load_checkpoint
from .base import AlignmentModel
from .checkpoint import check_state_dict_keys
from .eva_clip import EvaClipVisionConfig, EvaVisionTrunk
from .image_tower import ImageTower
from .points import normalise_unit_sphere
from .ulip2 import ULIP2PointEncoder

CHECKPOINT_NAME = "pretrained_models_ckpt_zero-sho_classification_checkpoint_pointbert.pt"

ULIP1_POINTBERT = dict(in_channels=3, trans_dim=384, depth=12, num_heads=6, mlp_ratio=4, num_group=512,
                       group_size=32, encoder_dims=256, pointnet_widths=(128, 256, 512), pos_hidden=128,
                       embed_dim=512, n_points=8192)
SLIP_VIT_B16 = EvaClipVisionConfig(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                                   mlp_hidden=3072, embed_dim=512, fused_qkv=True, post_norm=False, qkv_bias=True)
TIMM_VIT_MEAN = TIMM_VIT_STD = (0.5, 0.5, 0.5)
TIMM_VIT_CROP_PCT = 0.9
# tiny random models for tests
ULIP1_TINY = dict(ULIP1_POINTBERT, trans_dim=32, depth=2, num_heads=4, num_group=16, group_size=8, encoder_dims=24,
                  pointnet_widths=(16, 24, 40), pos_hidden=20, embed_dim=16, n_points=256)
TINY_VIT = EvaClipVisionConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, mlp_hidden=48,
                               embed_dim=16, fused_qkv=True, post_norm=False, qkv_bias=True)
_TEXT_AND_TEMPERATURE = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                         "logit_scale")


class ViTImageTower(ImageTower):
    """timm ``vit_base_patch16_224`` + ``image_projection`` as one trunk (``head`` = the projection, zero bias):
    ``forward(images [B, 3, S, S] in [0, 1]) -> unit-norm [B, 512]``; mean = std = 0.5 (timm's config)."""

    def __init__(self, trunk: EvaVisionTrunk, config: EvaClipVisionConfig = SLIP_VIT_B16) -> None:
        super().__init__(config.image_size, TIMM_VIT_MEAN, TIMM_VIT_STD)
        self.config = config
        self.trunk = trunk.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.trunk(self.pixels(images).to(self.trunk.head.weight.dtype)).float(), dim=-1)


def ulip1_state_dicts(official: dict, point_config: dict = ULIP1_POINTBERT,
                      vision_config: EvaClipVisionConfig = SLIP_VIT_B16) -> tuple[dict, dict]:
    """Official ``ULIP_PointBERT`` state dict -> (:class:`ULIP2PointEncoder` state for the 3-channel config,
    :class:`EvaVisionTrunk` state of the ViT with ``head.weight = image_projection.T``, ``head.bias = 0``).
    Drops ``module.``, the text tower and ``logit_scale``; KeyError / ValueError name bad keys / shapes."""
    points, vision = {}, {}
    for key, value in official.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_TEXT_AND_TEMPERATURE):
            continue
        if k.startswith("visual."):
            vision[k[len("visual."):]] = value
        elif k == "image_projection":
            vision["head.weight"] = value.t().contiguous()
            vision["head.bias"] = torch.zeros(value.shape[1], dtype=value.dtype)
        else:
            points[k] = value
    hint = f"the ULIP-1 PointBERT checkpoint {CHECKPOINT_NAME}"
    with torch.device("meta"):
        expect_p = {k: tuple(v.shape) for k, v in ULIP2PointEncoder(point_config).state_dict().items()}
        expect_v = {k: tuple(v.shape) for k, v in EvaVisionTrunk(vision_config).state_dict().items()}
    check_state_dict_keys("ulip1_state_dicts (point encoder)", points, expect_p, hint)
    check_state_dict_keys("ulip1_state_dicts (visual)", vision, expect_v, hint)
    return points, vision


class ULIP1Alignment(AlignmentModel):
    """ULIP-1 PointBERT (xyz only) + SLIP ViT-B/16 (column ``ulip1``). ``encode_points(points [B, N, >=3])``
    reads xyz only (rgb ignored), normalises to the unit sphere when ``normalise`` (off in the FlashVDM
    protocol, as there) and returns unit-norm [B, 512]."""

    name = "ulip1"

    def __init__(self, encoder: ULIP2PointEncoder, image_tower: ViTImageTower, config: dict = ULIP1_POINTBERT
                 ) -> None:
        super().__init__()
        self.config = dict(config)
        self.n_points = self.config["n_points"]
        self.encoder = encoder.eval().requires_grad_(False)
        self.image_tower = image_tower

    @classmethod
    def from_checkpoint(cls, path: str | Path, point_config: dict = ULIP1_POINTBERT,
                        vision_config: EvaClipVisionConfig = SLIP_VIT_B16, trust_pickle: bool = False
                        ) -> "ULIP1Alignment":
        """Load ``pretrained_models_ckpt_zero-sho_classification_checkpoint_pointbert.pt`` (point encoder and
        image tower both live in it)."""
        ckpt = load_checkpoint(path, "ULIP-1", f"{CHECKPOINT_NAME} (salesforce/ULIP, ULIP-1 PointBERT)",
                               trust_pickle, safe_globals=(argparse.Namespace,))
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"ULIP-1 checkpoint {str(path)!r} holds no state dict (expected {CHECKPOINT_NAME})")
        try:
            points, vision = ulip1_state_dicts(state, point_config, vision_config)
        except (KeyError, ValueError) as e:
            raise type(e)(f"{path}: {e.args[0]}") from e
        encoder = ULIP2PointEncoder(point_config)
        encoder.load_state_dict(points, strict=True)
        trunk = EvaVisionTrunk(vision_config)
        trunk.load_state_dict(vision, strict=True)
        return cls(encoder, ViTImageTower(trunk, vision_config), point_config)

    @torch.no_grad()
    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] < 3:
            raise ValueError(f"ULIP1Alignment.encode_points: expected [B, N, 3+] (xyz first), got "
                             f"{tuple(points.shape)}")
        xyz = points[..., :3].to(self.encoder.pc_projection.device, self.encoder.pc_projection.dtype)
        if self.normalise:
            xyz = normalise_unit_sphere(xyz)
        return F.normalize(self.encoder(xyz).float(), dim=-1)
