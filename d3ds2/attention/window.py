"""Windowed attention over sparse voxels: each voxel attends to the voxels of its (shifted) window³ cube."""
from __future__ import annotations

import torch

from ..sparse import SparseTensor
from .varlen import varlen_attention


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: SparseTensor, window: int, shift: int = 0
) -> torch.Tensor:
    """q/k/v: [N, H, D] in the row order of ``x``; windows of voxel p: (p + shift) // window per axis.

    The partition is cached on ``x`` (and so shared by every layer using the same window and shift).
    """
    part = x.window_layout(window, shift)
    q, k, v = (t.index_select(0, part.perm) for t in (q, k, v))
    out = varlen_attention(q, k, v, part.offsets, part.offsets, part.max_len, part.max_len)
    return out.index_select(0, part.inverse)
