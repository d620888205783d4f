"""Full attention within each sample of a sparse batch, and cross-attention to per-sample contexts."""
from __future__ import annotations

import torch

from ..sparse import SparseTensor
from .varlen import varlen_attention


def sparse_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: SparseTensor) -> torch.Tensor:
    """Every voxel attends to all voxels of its own sample. q/k/v: [N, H, D] in the row order of ``x``."""
    cu = x.offsets
    max_len = int(x.counts.max()) if x.batch_size else 0
    return varlen_attention(q, k, v, cu, cu, max_len, max_len)


def sparse_cross_attention(
    q: torch.Tensor, x: SparseTensor, k: torch.Tensor, v: torch.Tensor, context_offsets: torch.Tensor
) -> torch.Tensor:
    """Voxels of sample b attend to context rows ``context_offsets[b]:context_offsets[b+1]`` of k/v.

    q: [N, Hq, D]; k, v: [L, Hkv, D] packed contexts (dense contexts: offsets = arange(B + 1) * L_b).
    """
    max_q = int(x.counts.max()) if x.batch_size else 0
    max_k = int(context_offsets.diff().max()) if context_offsets.numel() > 1 else 0
    return varlen_attention(q, k, v, x.offsets, context_offsets, max_q, max_k)
