"""Sparse building blocks: residual ×2 down block, subdivide-up block, pre-LN sparse transformer block.

Module and parameter names follow the official Direct3D-S2 release (``act_layers``, ``out_layers``,
``skip_connection``, ``attn.to_qkv``, ``mlp.mlp.{0,2}``) so a checkpoint converter is a key-by-key map
(torchsparse ``conv.kernel [27, Cin, Cout]`` -> our ``weight [Cout, Cin, 3, 3, 3]``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..attention import sparse_self_attention, window_attention
from ..sparse import (
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseSiLU,
    SparseSubdivide,
    SparseTensor,
    SubMConv3d,
)
from .dit_layers import FeedForward


def norm_groups(channels: int, groups: int = 32) -> int:
    """Largest group count <= ``groups`` that divides ``channels`` (32 for every official width)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class SparseResDownBlock(nn.Module):
    """GN -> SiLU -> mean-pool ×2 -> conv3 -> GN -> SiLU -> conv3, plus mean-pooled (1×1 conv) skip.

    [N, Cin] at resolution R -> [M, Cout] at R/2 (M = occupied parent voxels).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.act_layers = nn.Sequential(SparseGroupNorm(norm_groups(in_channels, groups), in_channels), SparseSiLU())
        self.down = SparseDownsample(2)
        self.out_layers = nn.Sequential(
            SubMConv3d(in_channels, out_channels, 3),
            SparseGroupNorm(norm_groups(out_channels, groups), out_channels),
            SparseSiLU(),
            SubMConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection = SubMConv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.out_layers(self.down(self.act_layers(x)))
        skip = self.skip_connection(self.down(x))
        return h.replace(h.feats + skip.feats.to(h.dtype))


class SparseSubdivideBlock(nn.Module):
    """conv3 -> SiLU -> subdivide ×2 (8 children copy the parent) -> conv3 -> SiLU (no norm, no residual).

    [N, Cin] at resolution R -> [8N, Cout] at 2R.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.act_layers = nn.Sequential(SubMConv3d(in_channels, out_channels, 3), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(SubMConv3d(out_channels, out_channels, 3), SparseSiLU())

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.out_layers(self.sub(self.act_layers(x)))


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention over sparse voxels, windowed (``window``³ cubes shifted by ``shift``) or full.

    Fused ``to_qkv`` (C -> 3C, laid out [3, heads, head_dim]) and ``to_out``; no qk-norm, no RoPE.
    """

    def __init__(
        self, channels: int, num_heads: int, mode: str = "window", window: int = 8, shift: int = 0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if mode not in ("window", "full"):
            raise ValueError(f"attention mode must be 'window' or 'full', got {mode!r}")
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.num_heads, self.mode, self.window, self.shift = channels, num_heads, mode, window, shift
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        qkv = self.to_qkv(x.feats).view(x.num_voxels, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(1)
        if self.mode == "window":
            out = window_attention(q, k, v, x, self.window, self.shift)
        else:
            out = sparse_self_attention(q, k, v, x)
        return x.replace(self.to_out(out.reshape(x.num_voxels, self.channels)))

    def extra_repr(self) -> str:
        return f"{self.channels}, heads={self.num_heads}, mode={self.mode}, window={self.window}, shift={self.shift}"


class SparseTransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)); x + mlp(LN(x)). LayerNorms without affine (eps 1e-6), in float32."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "window",
        window: int = 8,
        shift: int = 0,
        qkv_bias: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = SparseLayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseSelfAttention(channels, num_heads, attn_mode, window, shift, qkv_bias)
        self.norm2 = SparseLayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: SparseTensor) -> SparseTensor:
        h = x.replace(x.feats + self.attn(self.norm1(x)).feats)
        return h.replace(h.feats + self.mlp(self.norm2(h).feats))

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            feats = checkpoint(lambda f: self._forward(x.replace(f)).feats, x.feats, use_reentrant=False)
            return x.replace(feats)
        return self._forward(x)
