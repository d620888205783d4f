"""The OpenCLIP EVA02-E-14-plus image tower (timm ``Eva`` parameter names; blocks from :mod:`.layers`).

Uni3D aligns its point embeddings with the image embeddings of OpenCLIP ``EVA02-E-14-plus`` (pretrained tag
``laion2b_s9b_b144k``; README and scripts/inference.sh of baaivision/Uni3D). transformers cannot build that
model, so its vision tower is written here, with the parameter names of the OpenCLIP checkpoint so that the
released file loads through :func:`eva_clip_state_dict`. Its blocks (:class:`~.layers.Block`) are shared with
the other encoders; the Uni3D point encoder's transformer is a timm ``Eva`` model too.

Facts used (no code taken), with their sources:

* OpenCLIP ``EVA02-E-14-plus`` (mlfoundations/open_clip src/open_clip/model_configs/EVA02-E-14-plus.json):
  embed_dim 1024, image_size 224, ``timm_model_name = eva02_enormous_patch14_clip_224``, ``timm_pool = token``,
  ``timm_proj = null``. OpenCLIP's ``TimmModel`` (src/open_clip/timm_model.py) then creates the timm model
  with ``num_classes = embed_dim`` and ``global_pool = pool``, i.e. timm's classifier ``head`` (a biased
  Linear) is the projection; the keys are ``visual.trunk.<timm name>``, the text tower ``text.*`` and
  ``logit_scale`` sit beside them. Preprocessing (src/open_clip/pretrained.py, entry ``EVA02-E-14-plus`` /
  ``laion2b_s9b_b144k``, hub ``timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k``, file
  ``open_clip_pytorch_model.bin``, bfloat16 weights): default OpenAI CLIP mean/std, 224 px, bicubic.
* timm ``eva02_enormous_patch14_clip_224`` (huggingface/pytorch-image-models timm/models/eva.py): patch 14,
  width 1792, depth 64, 16 heads (head dim 112), mlp_ratio 15360/1792 (hidden 15360, GELU ``Mlp``),
  ``use_post_norm=True`` (``EvaBlockPostNorm``: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``), fused qkv
  (``attn.qkv.weight`` without bias, learned ``attn.q_bias`` and ``attn.v_bias``, zero k bias that is a
  non-persistent buffer), abs. position embedding with a class token, NO rotary embedding, NO SwiGLU;
  ``global_pool='token'`` -> final ``norm`` (LayerNorm) on all tokens, token 0 pooled, ``fc_norm`` Identity,
  ``head`` Linear(1792, 1024). LayerNorm eps 1e-6 (timm ``LayerNorm``; ``layernorm_epsilon=1e-6`` of the
  EVA-CLIP ``eva-clip-4b-14-x`` config, which also lists ``rope=False, naiveswiglu=False, subln=False,
  postnorm=True``). The EVA-CLIP original checkpoint is QuanSun/EVA-CLIP ``EVA02_CLIP_E_psz14_plus_s9B.pt``
  (EVA-CLIP key names); the file loaded here is the OpenCLIP/timm conversion named above.
* timm EVA02 blocks used by Uni3D-l/-b (eva02_large/base_patch14_448): separate ``attn.q_proj`` (bias),
  ``attn.k_proj`` (no bias), ``attn.v_proj`` (bias) (``qkv_fused=False``) and ``SwiGLU`` with a sub-LN
  (timm/layers/mlp.py ``SwiGLU``: ``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))``), pre-norm residuals.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_tower import ImageTower
from ...checkpoint import load_checkpoint
from .checkpoint import check_state_dict_keys, load_into
from .layers import LN_EPS, Block

EVA02_E_14_PLUS_HUB = "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k"
EVA02_E_14_PLUS_FILE = "open_clip_pytorch_model.bin"


@dataclass(frozen=True)
class EvaClipVisionConfig:
    """Hyperparameters of an EVA CLIP vision tower (timm ``Eva`` with token pooling and a Linear head)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1792
    depth: int = 64
    num_heads: int = 16
    mlp_hidden: int = 15360
    embed_dim: int = 1024
    fused_qkv: bool = True
    swiglu: bool = False
    post_norm: bool = True
    qkv_bias: bool = False  # a full ``attn.qkv.bias`` (timm ViT) instead of EVA's q / v biases


EVA02_E_14_PLUS = EvaClipVisionConfig()  # OpenCLIP EVA02-E-14-plus (see the module docstring)
TINY_EVA_CLIP = EvaClipVisionConfig(image_size=28, patch_size=7, width=32, depth=2, num_heads=4, mlp_hidden=48,
                                    embed_dim=16)


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EvaVisionTrunk(nn.Module):
    """timm ``Eva`` as OpenCLIP's EVA02-E-14-plus trunk (with ``qkv_bias`` and pre-norm blocks: timm
    ``VisionTransformer``, ULIP-1's image side): patch embed, class token, abs. position embedding, blocks, final
    ``norm``, class-token pooling, ``head`` projection. images [B, 3, S, S] (normalised) -> [B, E]."""

    def __init__(self, config: EvaClipVisionConfig) -> None:
        super().__init__()
        c = config
        if c.image_size % c.patch_size:
            raise ValueError(f"EvaVisionTrunk: image size {c.image_size} is not a multiple of patch {c.patch_size}")
        self.patch_embed = _PatchEmbed(c.patch_size, c.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (c.image_size // c.patch_size) ** 2 + 1, c.width))
        self.blocks = nn.ModuleList(Block(c.width, c.num_heads, c.mlp_hidden, c.fused_qkv, swiglu=c.swiglu,
                                          post_norm=c.post_norm, qkv_bias=c.qkv_bias)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=LN_EPS)
        self.head = nn.Linear(c.width, c.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


_VISUAL_PREFIX = "visual.trunk."
# Non-persistent timm buffers some exports carry anyway: the zero k bias, rotary tables.
_IGNORED_SUFFIXES = (".attn.k_bias",)


def eva_clip_state_dict(official: dict, config: EvaClipVisionConfig = EVA02_E_14_PLUS) -> dict:
    """OpenCLIP EVA CLIP state dict -> :class:`EvaVisionTrunk` state dict.

    Unwraps ``state_dict`` / ``module`` containers and a ``module.`` prefix, keeps the ``visual.trunk.`` keys
    (prefix stripped; text tower and ``logit_scale`` are dropped), drops non-persistent timm buffers
    (``attn.k_bias``, ``rope.*``) and checks names and shapes against ``config``. Raises KeyError naming the
    missing / unexpected keys, ValueError naming shape mismatches. Tensors are passed through unchanged.
    """
    for key in ("state_dict", "module"):
        if key in official and isinstance(official[key], dict):
            official = official[key]
    out = {}
    for k, v in official.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if not k.startswith("visual."):
            continue  # text tower, logit_scale
        if not k.startswith(_VISUAL_PREFIX):
            out[k] = v  # e.g. an OpenCLIP proj head: reported as unexpected below
            continue
        k = k[len(_VISUAL_PREFIX):]
        if k.endswith(_IGNORED_SUFFIXES) or k.startswith("rope."):
            continue
        out[k] = v
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in EvaVisionTrunk(config).state_dict().items()}
    check_state_dict_keys("eva_clip_state_dict", out, expected,
                          hint=f"an OpenCLIP EVA02-E-14-plus checkpoint ({EVA02_E_14_PLUS_HUB}/{EVA02_E_14_PLUS_FILE}) "
                               "with keys 'visual.trunk.*'")
    return out


class EvaClipImageTower(ImageTower):
    """Frozen OpenCLIP EVA02-E-14-plus image tower: ``preprocess(list) -> [B, 3, S, S]`` in [0, 1] on white (the
    conditioner's foreground crop, as :class:`~d3ds2.eval.alignment.image_tower.ClipImageTower`), ``forward`` ->
    unit-norm embeddings [B, 1024]. ``config`` + ``seed`` build a random tower (tests); real weights come from
    :meth:`from_checkpoint`."""

    def __init__(self, config: EvaClipVisionConfig = EVA02_E_14_PLUS, seed: int = 0,
                 trunk: EvaVisionTrunk | None = None) -> None:
        super().__init__(config.image_size)
        if trunk is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                trunk = EvaVisionTrunk(config)
                for name, p in trunk.named_parameters():  # non-degenerate random init
                    if name.endswith("weight") and p.dim() > 1:
                        nn.init.trunc_normal_(p, std=0.02)
                    elif "norm" in name and name.endswith("weight"):
                        nn.init.ones_(p)
                    else:
                        nn.init.normal_(p, std=0.02)
        self.config = config
        self.trunk = trunk.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str, config: EvaClipVisionConfig = EVA02_E_14_PLUS,
                        dtype: torch.dtype = torch.float32, trust_pickle: bool = False) -> "EvaClipImageTower":
        """The OpenCLIP checkpoint file (``open_clip_pytorch_model.bin`` of the hub repo
        ``timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k``, what Uni3D's README names). The
        vision tower has 4.4 B parameters: 17.6 GB in float32, pass ``dtype=torch.bfloat16`` (the file's own
        precision) and move the tower to a GPU to halve that."""
        sd = load_checkpoint(path, "EvaClipImageTower", f"{EVA02_E_14_PLUS_HUB}/{EVA02_E_14_PLUS_FILE}",
                                  trust_pickle)
        with torch.device("meta"):
            trunk = EvaVisionTrunk(config)
        return cls(config, trunk=load_into(trunk, eva_clip_state_dict(sd, config), dtype))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.trunk(self.pixels(images).to(self.trunk.head.weight.dtype))
        return F.normalize(emb.float(), dim=-1)
