"""Dense "index" DiT: a velocity model over the 8 x 16^3 latents of the occupancy VAE (4096 tokens).

Same block structure as the sparse DiT (adaLN-Zero, self-attention, cross-attention, 4x MLP) with full
self-attention over the 4096 tokens, fused ``to_qkv`` with bias and per-head RMS norm on q and k. The
absolute PE of the 16^3 grid is a persistent buffer ``pos_emb`` [4096, C] (official layout), so the
official v1.1 config has 559.74M parameters + buffer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .embeddings import AbsolutePositionEmbedder
from .dit_init import init_dit_weights
from .dit_layers import Context, CrossAttention, FeedForward, fp32, layer_norm32
from .timestep import TimestepEmbedder


class MultiHeadRMSNorm(nn.Module):
    """x [..., H, D] -> L2-normalised (float32) x gamma [H, D] x sqrt(D)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fp32(x)
        return (F.normalize(h, dim=-1) * self.gamma.to(h.dtype) * self.scale).to(x.dtype)


class DenseSelfAttention(nn.Module):
    """Full multi-head self-attention over [B, L, C] with q/k RMS norm (to_qkv and to_out with bias)."""

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.to_qkv(h).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))


class ModulatedDenseBlock(nn.Module):
    """adaLN-Zero block over [B, L, C] tokens (see :class:`~d3ds2.models.sparse_dit.ModulatedSparseBlock`)."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, mlp_ratio: float = 4.0, qk_rms_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = DenseSelfAttention(channels, num_heads, qk_rms_norm)
        self.cross_attn = CrossAttention(channels, context_channels, num_heads)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, h: torch.Tensor, t_emb: torch.Tensor, ctx: Context) -> torch.Tensor:
        b, n, c = h.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            m[:, None] for m in fp32(self.adaLN_modulation(t_emb)).chunk(6, dim=1)
        )
        x = layer_norm32(h, self.norm1) * (1 + scale_a) + shift_a
        h = h + self.self_attn(x) * gate_a
        x = layer_norm32(h, self.norm2).reshape(b * n, c)
        q_offsets = torch.arange(b + 1, device=h.device, dtype=torch.int32) * n
        h = h + self.cross_attn(x, q_offsets, n, ctx).view(b, n, c)
        x = layer_norm32(h, self.norm3) * (1 + scale_m) + shift_m
        return h + self.mlp(x) * gate_m


class DenseDiT(nn.Module):
    """Velocity model over dense latents [B, in_channels, R, R, R] (R = resolution, patch size 1).

    forward(x [B, C, R, R, R], t [B] on the 0..1000 scale, cond [B, L, cond_channels]) -> same shape as x.
    """

    def __init__(
        self,
        resolution: int = 16,
        in_channels: int = 8,
        model_channels: int = 1024,
        cond_channels: int = 1024,
        num_blocks: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qk_rms_norm: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.resolution, self.in_channels, self.model_channels = resolution, in_channels, model_channels
        self.use_checkpoint = use_checkpoint
        self.t_embedder = TimestepEmbedder(model_channels)
        grid = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels, 3)(grid))
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedDenseBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm) for _ in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, r = x.shape[0], self.resolution
        if x.shape[1:] != (self.in_channels, r, r, r):
            raise ValueError(f"DenseDiT: expected x [B, {self.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}")
        if t.shape != (b,) or cond.dim() != 3 or cond.shape[0] != b:
            raise ValueError(f"DenseDiT: need t [{b}] and cond [{b}, L, C]; got {tuple(t.shape)} and {tuple(cond.shape)}")
        h = x.flatten(2).transpose(1, 2)  # [B, R^3, C] in (x, y, z) order, z fastest
        h = fp32(self.input_layer(h)) + self.pos_emb
        t_emb = self.t_embedder(t)
        ctx = Context.from_dense(cond)
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, t_emb, ctx, use_reentrant=False)
            else:
                h = block(h, t_emb, ctx)
        h = self.out_layer(F.layer_norm(h, (self.model_channels,), eps=1e-5))
        return h.transpose(1, 2).reshape(b, self.in_channels, r, r, r)
