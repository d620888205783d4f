"""Sparse DiT (SS-DiT) of Direct3D-S2: a velocity model over the sparse SDF latents.

Tokens are the occupied latent voxels (a :class:`SparseTensor`, feats [N, in_channels]); every block is
adaLN-Zero modulated by the timestep, attends to the other tokens of its sample (SSA, full or windowed
attention, one interface), cross-attends to the image condition and applies a 4x MLP. Parameter names
and shapes follow the official release (docs/generation.md), so the v1.1 config has 509.29M parameters
and v1.0 (sparse conditions, m_cmp 4, compression v2) 520.08M.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from d3ds2.kernels.modulation import gated_residual, modulated_layer_norm

from ..attention import varlen_attention, window_attention
from ..sparse import SparseTensor
from .embeddings import AbsolutePositionEmbedder
from .dit_init import init_dit_weights
from .timestep import TimestepEmbedder

ATTENTION_MODES = ("full", "window", "ssa")


@dataclass
class Context:
    """Packed cross-attention context: rows ``offsets[b]:offsets[b+1]`` of ``feats`` [L, C] belong to sample b;
    ``max_len``: the longest sample (computed once, so the blocks do not sync with the device)."""

    feats: torch.Tensor
    offsets: torch.Tensor
    max_len: int

    @classmethod
    def from_dense(cls, cond: torch.Tensor) -> "Context":
        """cond [B, L, C] -> packed context (every sample has L tokens)."""
        b, length, _ = cond.shape
        offsets = torch.arange(b + 1, device=cond.device, dtype=torch.int32) * length
        return cls(cond.reshape(b * length, -1), offsets, length)

    @classmethod
    def from_packed(cls, feats: torch.Tensor, offsets: torch.Tensor) -> "Context":
        return cls(feats, offsets, int(offsets.diff().max()) if offsets.numel() > 1 else 0)

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1


@dataclass
class SparseCondition:
    """Variable-length condition tokens per sample (v1.0 sparse conditioning).

    feats [L, C]; pos [L, 3] integer positions for the APE (patch (col, row, 0), global tokens (0, 0, 1));
    offsets [B + 1] int: rows of sample b are ``offsets[b]:offsets[b+1]``.
    """

    feats: torch.Tensor
    pos: torch.Tensor
    offsets: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def batch_ids(self) -> torch.Tensor:
        """[L] int64 sample of each token."""
        counts = self.offsets.diff().long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def replace(self, feats: torch.Tensor) -> "SparseCondition":
        return SparseCondition(feats, self.pos, self.offsets)

    def cat(self, other: "SparseCondition") -> "SparseCondition":
        """Samples of ``other`` after those of self."""
        offsets = torch.cat([self.offsets, other.offsets[1:] + self.offsets[-1]])
        return SparseCondition(torch.cat([self.feats, other.feats]), torch.cat([self.pos, other.pos]), offsets)

    def to(self, *args, **kwargs) -> "SparseCondition":
        feats = self.feats.to(*args, **kwargs)
        return SparseCondition(feats, self.pos.to(feats.device), self.offsets.to(feats.device))


class GQASelfAttention(nn.Module):
    """Full (per sample) or windowed multi-head self-attention with grouped KV heads over sparse tokens.

    Same projection names and shapes as SSA (proj_q/k/v/o, no bias), so 'full'/'window' checkpoints
    differ from 'ssa' ones only by the SSA-specific parameters. window None = full attention. The three
    input projections run as one GEMM (their weights concatenated).
    """

    def __init__(self, channels: int, num_heads: int, num_kv_heads: int, window: int | None = None, shift: int = 0,
                 kernel: str = "auto"):
        super().__init__()
        if channels % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"GQASelfAttention: channels ({channels}) must divide by num_heads ({num_heads}), "
                f"and num_heads by num_kv_heads ({num_kv_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, channels // num_heads
        self.window, self.shift, self.kernel = window, shift, kernel
        kv = num_kv_heads * self.head_dim
        self.proj_q = nn.Linear(channels, channels, bias=False)
        self.proj_k = nn.Linear(channels, kv, bias=False)
        self.proj_v = nn.Linear(channels, kv, bias=False)
        self.proj_o = nn.Linear(channels, channels, bias=False)

    def forward(self, h: torch.Tensor, tokens: "TokenLayout") -> torch.Tensor:
        """h [N, C] in the canonical row order of ``tokens.x`` -> [N, C]."""
        n, d, kv = h.shape[0], self.head_dim, self.num_kv_heads * self.head_dim
        weight = torch.cat([self.proj_q.weight, self.proj_k.weight, self.proj_v.weight])
        q, k, v = F.linear(h, weight).split([self.num_heads * d, kv, kv], dim=1)
        q, k, v = q.view(n, self.num_heads, d), k.view(n, self.num_kv_heads, d), v.view(n, self.num_kv_heads, d)
        if self.window is None:  # full attention per sample
            o = varlen_attention(q, k, v, tokens.offsets, tokens.offsets, tokens.max_len, tokens.max_len,
                                 kernel=self.kernel)
        else:
            o = window_attention(q, k, v, tokens.x, self.window, self.shift)
        return self.proj_o(o.reshape(n, -1))


def build_self_attention(
    mode: str, channels: int, num_heads: int, num_kv_heads: int, window: int, shift: int, ssa: dict | None,
    kernel: str = "auto",
) -> nn.Module:
    """The self-attention of one block: 'full' | 'window' | 'ssa' (``ssa``: SSA hyper-parameters; ``kernel``:
    the varlen kernel of full attention, see :func:`varlen_attention`)."""
    if mode == "full":
        return GQASelfAttention(channels, num_heads, num_kv_heads, kernel=kernel)
    if mode == "window":
        return GQASelfAttention(channels, num_heads, num_kv_heads, window, shift)
    if mode == "ssa":
        try:
            from ..attention import SpatialSparseAttention, SSAConfig
        except ImportError as e:  # the SSA module is not merged in this checkout
            raise ImportError("attention='ssa' needs d3ds2.attention.SpatialSparseAttention; use 'full' or 'window'") from e
        cfg = SSAConfig(**{"m_win": window, "window_shift": shift, **(ssa or {})})
        return SpatialSparseAttention(channels, num_heads, num_kv_heads, config=cfg)
    raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")


class CrossAttention(nn.Module):
    """Packed queries [N, C] attend to a packed :class:`Context` (to_q, to_kv, to_out with bias)."""

    def __init__(self, channels: int, context_channels: int, num_heads: int, kernel: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim, self.kernel = num_heads, channels // num_heads, kernel
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, q_offsets: torch.Tensor, max_q: int, ctx: Context) -> torch.Tensor:
        """h [N, C] with sample rows ``q_offsets[b]:q_offsets[b+1]`` -> [N, C]."""
        n, hd = h.shape[0], (self.num_heads, self.head_dim)
        q = self.to_q(h).view(n, *hd)
        k, v = self.to_kv(ctx.feats).view(-1, 2, *hd).unbind(1)
        o = varlen_attention(q, k, v, q_offsets, ctx.offsets, max_q, ctx.max_len, kernel=self.kernel)
        return self.to_out(o.reshape(n, -1))


class FeedForward(nn.Module):
    """Linear -> tanh-GELU -> Linear, hidden = ratio x channels (parameter names ``mlp.{0,2}``)."""

    def __init__(self, channels: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h)


def fp32(h: torch.Tensor) -> torch.Tensor:
    """h in float32, or float64 if it already is (reference tests run models in double)."""
    return h if h.dtype == torch.float64 else h.float()


def layer_norm32(h: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """Apply ``norm`` in (at least) float32, also under autocast."""
    h = fp32(h)
    w = None if norm.weight is None else norm.weight.to(h.dtype)
    b = None if norm.bias is None else norm.bias.to(h.dtype)
    return F.layer_norm(h, norm.normalized_shape, w, b, norm.eps)


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls consuming h run in: the autocast dtype of h's device when autocast is on."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


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
