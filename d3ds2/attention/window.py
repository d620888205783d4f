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
    out = varlen_attention(q[part.perm], k[part.perm], v[part.perm], part.offsets, part.offsets, part.max_len, part.max_len)
    return out[part.inverse]
