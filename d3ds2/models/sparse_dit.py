"""Sparse DiT (SS-DiT) of Direct3D-S2: a velocity model over the sparse SDF latents.

Tokens are the occupied latent voxels (a :class:`SparseTensor`, feats [N, in_channels]); every block is
adaLN-Zero modulated by the timestep, attends to the other tokens of its sample (SSA, full or windowed
attention, one interface), cross-attends to the image condition and applies a 4x MLP. Parameter names
and shapes follow the official release (docs/generation.md), so the v1.1 config has 509.29M parameters
and v1.0 (sparse conditions, m_cmp 4, compression v2) 520.08M. The layers it shares with the dense DiT are in
:mod:`d3ds2.models.dit_layers`, its self-attention in :mod:`d3ds2.attention.self_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from d3ds2.kernels.modulation import gated_residual, modulated_layer_norm

from ..attention import build_self_attention
from ..sparse import SparseTensor
from .dit_init import init_dit_weights
from .dit_layers import Context, CrossAttention, FeedForward, SparseCondition, compute_dtype, fp32
from .embeddings import AbsolutePositionEmbedder
from .timestep import TimestepEmbedder


@dataclass
class TokenLayout:
    """The token rows of one forward as every block sees them (built once per forward, no sync per block).

    x: the input SparseTensor (canonical coords order; its cache holds kernel maps, windows, SSA layout).
    ssa: the SSA layout when the blocks run in SSA block order (features permuted once on entry and back
    once on exit, not in every block), else None (canonical order). offsets [B + 1] int32 and batch_ids
    [N] int32: both orders keep every sample's rows contiguous and in batch order, so they are the same.
    max_len: tokens of the largest sample.
    """

    x: SparseTensor
    offsets: torch.Tensor
    batch_ids: torch.Tensor
    max_len: int
    ssa: Any = None

    @classmethod
    def of(cls, x: SparseTensor, ssa_attention: nn.Module | None = None) -> "TokenLayout":
        """Layout of x; ``ssa_attention``: an SSA module whose (cached) layout orders the rows."""
        offsets = x.cached("offsets_int32", lambda: x.offsets.int())
        max_len = x.cached("max_count", lambda: int(x.counts.max()) if x.batch_size else 0)
        if ssa_attention is None:
            return cls(x, offsets, x.cached("batch_ids_int32", lambda: x.coords[:, 0].contiguous()), max_len)
        layout = ssa_attention.layout_for(x)
        return cls(x, offsets, layout.sample_of_token, max_len, layout)


class ModulatedSparseBlock(nn.Module):
    """adaLN-Zero block: LN1+modulate -> self-attn -> gate; LN2 (affine) -> cross-attn; LN3+modulate -> MLP -> gate.

    Modulation is per sample ([B, 6C] from the timestep embedding); the fused kernels of
    :mod:`d3ds2.kernels.modulation` apply each token's sample row without a per-token copy. The residual
    stream stays float32; the normalised inputs of the matmuls come out in the compute dtype.
    """

    def __init__(self, channels: int, context_channels: int, num_heads: int, self_attn: nn.Module, mlp_ratio: float = 4.0,
                 kernel: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = self_attn
        self.cross_attn = CrossAttention(channels, context_channels, num_heads, kernel)
        self.mlp = FeedForward(channels, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def self_attention(self, h: torch.Tensor, tokens: TokenLayout) -> torch.Tensor:
        if tokens.ssa is not None:  # rows already in SSA order
            return self.self_attn.attend(h, tokens.ssa)
        return self.self_attn(h, tokens)

    def forward(self, h: torch.Tensor, tokens: TokenLayout, t_emb: torch.Tensor, ctx: Context) -> torch.Tensor:
        """h [N, C] float32 residual stream (rows in ``tokens`` order), t_emb [B, C] -> updated h [N, C]."""
        dt, ids = compute_dtype(h), tokens.batch_ids
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        x = modulated_layer_norm(h, shift_a, scale_a, ids, self.norm1.eps, out_dtype=dt)
        h = gated_residual(h, self.self_attention(x, tokens), gate_a, ids)
        x = modulated_layer_norm(h, self.norm2.bias[None], self.norm2.weight[None], None, self.norm2.eps, one=0.0, out_dtype=dt)
        h = h + self.cross_attn(x, tokens.offsets, tokens.max_len, ctx)
        x = modulated_layer_norm(h, shift_m, scale_m, ids, self.norm3.eps, out_dtype=dt)
        return gated_residual(h, self.mlp(x), gate_m, ids)


class SparseDiT(nn.Module):
    """Velocity model v(x_t, t, cond) over sparse latents.

    Args:
        in_channels: latent channels (16).
        model_channels: width (1024). num_blocks: depth (24). num_heads / num_kv_heads: 32 / 2 (GQA).
        cond_channels: channels of the condition tokens (DINOv2-L: 1024).
        attention: 'ssa' | 'full' | 'window'. window_size: window of the window branch / window mode (8);
            use_shift: odd blocks shift their windows by window_size // 2.
        ssa: SSA hyper-parameters (m_cmp, m_slc, topk, compression...) passed to ``SSAConfig``.
        pe_factor: the absolute PE sees latent coords x pe_factor (1.0 at 512, 0.5 at 1024).
        sparse_conditions: condition is a SparseTensor of foreground tokens (v1.0): cond_proj + APE.
        use_checkpoint: gradient checkpointing of every block.
        attention_kernel: the varlen kernel of cross-attention and of 'full' self-attention: 'auto' (FlashAttention
            on the GPU) | 'flash' | 'span' (the Triton span kernel) | 'torch' (see :func:`varlen_attention`).
    forward(x: SparseTensor [N, in], t: [B] on the 0..1000 scale, cond: [B, L, cond_channels] or
    SparseCondition) -> SparseTensor [N, in] (velocity eps - x0).
    """

    def __init__(
        self,
        in_channels: int = 16,
        model_channels: int = 1024,
        cond_channels: int = 1024,
        num_blocks: int = 24,
        num_heads: int = 32,
        num_kv_heads: int = 2,
        mlp_ratio: float = 4.0,
        attention: str = "ssa",
        window_size: int = 8,
        use_shift: bool = True,
        ssa: dict | None = None,
        pe_factor: float = 1.0,
        sparse_conditions: bool = False,
        use_checkpoint: bool = False,
        attention_kernel: str = "auto",
    ) -> None:
        super().__init__()
        if sparse_conditions and cond_channels != model_channels:
            raise ValueError("SparseDiT: sparse_conditions needs cond_channels == model_channels (cond_proj is C->C)")
        self.in_channels, self.model_channels = in_channels, model_channels
        self.pe_factor, self.sparse_conditions, self.use_checkpoint = pe_factor, sparse_conditions, use_checkpoint
        self.attention = attention
        self.t_embedder = TimestepEmbedder(model_channels)
        self.input_layer = nn.Linear(in_channels, model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels, 3)
        if sparse_conditions:
            self.cond_proj = nn.Linear(cond_channels, model_channels)
        shift = window_size // 2 if use_shift else 0
        self.blocks = nn.ModuleList(
            ModulatedSparseBlock(
                model_channels,
                cond_channels if not sparse_conditions else model_channels,
                num_heads,
                build_self_attention(attention, model_channels, num_heads, num_kv_heads, window_size, shift * (i % 2), ssa,
                                     attention_kernel),
                mlp_ratio,
                attention_kernel,
            )
            for i in range(num_blocks)
        )
        self.out_layer = nn.Linear(model_channels, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self)

    def context(self, cond: torch.Tensor | SparseCondition) -> Context:
        """The packed cross-attention context of a dense [B, L, C] or sparse (foreground tokens) condition."""
        if self.sparse_conditions:
            if not isinstance(cond, SparseCondition):
                raise TypeError("SparseDiT(sparse_conditions=True) expects a SparseCondition (see ImageConditioner.sparse)")
            feats = self.cond_proj(cond.feats) + self.pos_embedder(cond.pos).to(cond.feats.dtype)
            return Context.from_packed(feats, cond.offsets)
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
            raise TypeError("SparseDiT expects a dense condition [B, L, C] (sparse_conditions=False)")
        return Context.from_dense(cond)

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor | SparseCondition) -> SparseTensor:
        ctx = self.context(cond)
        if t.shape != (x.batch_size,) or ctx.batch_size != x.batch_size:
            raise ValueError(
                f"SparseDiT: batch sizes differ: x has {x.batch_size} samples, t has shape {tuple(t.shape)}, "
                f"cond has {ctx.batch_size} samples"
            )
        ssa = self.blocks[0].self_attn if self.attention == "ssa" else None
        tokens = TokenLayout.of(x, ssa)
        feats, pos = x.feats, x.coords[:, 1:]
        if tokens.ssa is not None:
            feats, pos = feats[tokens.ssa.perm], tokens.ssa.coords[:, 1:]
        h = fp32(self.input_layer(feats)) + self.pos_embedder(pos * self.pe_factor)
        t_emb = self.t_embedder(t)
        ctx = Context(ctx.feats.to(compute_dtype(h)), ctx.offsets, ctx.max_len)  # cast once, not per block
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, tokens, t_emb, ctx, use_reentrant=False)
            else:
                h = block(h, tokens, t_emb, ctx)
        out = self.out_layer(F.layer_norm(h, (self.model_channels,), eps=1e-5))
        return x.replace(out if tokens.ssa is None else out[tokens.ssa.inverse])
