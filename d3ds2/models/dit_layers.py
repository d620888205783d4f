"""Layers the DiTs share: the packed cross-attention context and its sparse (v1.0) condition, cross-attention,
the feed-forward MLP, and the float32 helpers of the residual stream. Parameter names follow the official
release (docs/generation.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import varlen_attention


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
    """Linear(C, ratio·C) -> tanh-GELU -> Linear(ratio·C, C) on [..., C] feats (parameter names ``mlp.{0,2}``);
    the MLP of every transformer block (DiTs and the sparse VAE)."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
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
