"""The self-attention of a DiT block: grouped-query full (per sample) or windowed attention over sparse tokens,
or SSA, chosen by name (:func:`build_self_attention`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ssa import SpatialSparseAttention, SSAConfig
from .varlen import varlen_attention
from .window import window_attention

ATTENTION_MODES = ("full", "window", "ssa")


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

    def forward(self, h: torch.Tensor, tokens) -> torch.Tensor:
        """h [N, C] in the canonical row order of ``tokens.x`` -> [N, C]; ``tokens``: the DiT's token layout
        (:class:`d3ds2.models.sparse_dit.TokenLayout`: x, offsets, max_len)."""
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
        cfg = SSAConfig(**{"m_win": window, "window_shift": shift, **(ssa or {})})
        return SpatialSparseAttention(channels, num_heads, num_kv_heads, config=cfg)
    raise ValueError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
