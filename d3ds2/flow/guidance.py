"""Classifier-free guidance helpers: condition dropout for training and batch doubling for sampling.

Batches are dense tensors [B, ...], :class:`SparseTensor` (samples = batch index of the coords) or
:class:`SparseCondition` (variable-length condition tokens).
"""
from __future__ import annotations

import torch

from ..models.dit_layers import SparseCondition
from ..sparse import SparseTensor

Batch = torch.Tensor | SparseTensor | SparseCondition


def null_condition(cond: Batch) -> Batch:
    """The unconditional input: zeros of the condition features (positions kept for sparse conditions)."""
    if isinstance(cond, (SparseTensor, SparseCondition)):
        return cond.replace(torch.zeros_like(cond.feats))
    return torch.zeros_like(cond)


def drop_conditions(cond: Batch, p: float, generator: torch.Generator | None = None) -> tuple[Batch, torch.Tensor]:
    """Replace each sample's condition by zeros with probability p. Returns (cond, dropped [B] bool)."""
    sparse = isinstance(cond, (SparseTensor, SparseCondition))
    b = cond.batch_size if sparse else cond.shape[0]
    dropped = (torch.rand(b, generator=generator) < p).to(cond.device)
    if sparse:
        keep = (~dropped)[cond.batch_ids].to(cond.dtype).unsqueeze(1)
        return cond.replace(cond.feats * keep), dropped
    keep = (~dropped).to(cond.dtype).view(b, *([1] * (cond.dim() - 1)))
    return cond * keep, dropped


def cat_batches(a: Batch, b: Batch) -> Batch:
    """Batch b's samples after a's (sparse: b's batch indices shifted by a.batch_size; stays sorted)."""
    if isinstance(a, SparseCondition):
        return a.cat(b)
    if isinstance(a, SparseTensor):
        cb = b.coords.clone()
        cb[:, 0] += a.batch_size
        return SparseTensor(torch.cat([a.feats, b.feats]), torch.cat([a.coords, cb]), a.batch_size + b.batch_size, check=False)
    return torch.cat([a, b])
