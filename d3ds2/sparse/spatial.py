"""Resolution changes of sparse tensors: ×2 downsampling (mean pool), subdivision, unpooling, pruning.

A downsample returns a :class:`DownsampleMap` that remembers the fine voxel set, so the decoder side can
restore exactly those sites (:func:`unpool`, ``SparseConvTranspose3d``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .coords import pack_keys
from .kernel_map import KernelMap, child_map
from .tensor import SparseTensor


@dataclass
class DownsampleMap:
    """Link between a fine tensor and its ×factor coarser parent set.

    fine_coords: [N_fine, 4] int32; parent_of_fine: [N_fine] int64 row of each voxel's parent;
    children: the stride-``factor`` kernel map (fine -> parent rows); factor: the scale.
    """

    fine_coords: torch.Tensor
    fine_batch_size: int
    parent_of_fine: torch.Tensor
    children: KernelMap
    factor: int


def parent_coords(coords: torch.Tensor, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique sorted parent coords [M, 4] of coords [N, 4] and the parent row of each voxel [N]."""
    parents = torch.cat([coords[:, :1], torch.div(coords[:, 1:], factor, rounding_mode="floor")], 1)
    keys, inverse = torch.unique(pack_keys(parents), return_inverse=True)
    first = torch.zeros(keys.numel(), dtype=torch.long, device=coords.device)
    first.scatter_(0, inverse, torch.arange(coords.shape[0], device=coords.device))
    return parents[first], inverse


def downsample_map(x: SparseTensor, factor: int = 2) -> tuple[torch.Tensor, DownsampleMap]:
    """Parent coords of ``x`` and the map back to it (cached on ``x``)."""

    def build():
        pc, inverse = parent_coords(x.coords, factor)
        return pc, DownsampleMap(x.coords, x.batch_size, inverse, child_map(x.keys, pc, factor), factor)

    return x.cached(("downsample", factor), build)


def mean_pool(x: SparseTensor, factor: int = 2) -> tuple[SparseTensor, DownsampleMap]:
    """Average the voxels of each factor³ cell (accumulated in float32). Returns (coarse, map)."""
    pc, dmap = downsample_map(x, factor)
    feats = x.feats.float()
    summed = feats.new_zeros(pc.shape[0], *feats.shape[1:]).index_add_(0, dmap.parent_of_fine, feats)
    count = torch.bincount(dmap.parent_of_fine, minlength=pc.shape[0]).clamp_min(1)
    mean = summed / count.view(-1, *([1] * (feats.dim() - 1)))
    return SparseTensor(mean.to(x.dtype), pc, x.batch_size, check=False), dmap


def unpool(coarse: SparseTensor, dmap: DownsampleMap) -> SparseTensor:
    """Restore the fine voxel set of ``dmap``; each fine voxel copies its parent's feats."""
    return SparseTensor(coarse.feats[dmap.parent_of_fine], dmap.fine_coords, dmap.fine_batch_size, check=False)


CHILD_OFFSETS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=torch.int32)
"""Child c of voxel p sits at 2p + CHILD_OFFSETS[c]: lexicographic order (0,0,0), (0,0,1), ..., (1,1,1)."""


def subdivide(x: SparseTensor) -> SparseTensor:
    """Replace every voxel by its 8 children at twice the resolution; children copy the parent's feats.

    The output is in canonical (sorted) order; ``out.cache['subdivide_parent']`` holds each output
    voxel's parent row in ``x``.
    """
    n = x.num_voxels
    off = CHILD_OFFSETS.to(x.device)
    child = x.coords.unsqueeze(1).repeat(1, 8, 1)
    child[:, :, 1:] = child[:, :, 1:] * 2 + off
    child = child.reshape(-1, 4)
    parent = torch.arange(n, device=x.device).repeat_interleave(8)
    order = torch.argsort(pack_keys(child))
    out = SparseTensor(x.feats[parent[order]], child[order], x.batch_size, check=False)
    out.cache["subdivide_parent"] = parent[order]
    return out


def prune(x: SparseTensor, keep: torch.Tensor) -> SparseTensor:
    """Keep the voxels where the boolean mask ``keep`` [N] is True (order is preserved)."""
    if keep.dtype != torch.bool or keep.shape != (x.num_voxels,):
        raise ValueError(f"prune expects a bool mask of shape [{x.num_voxels}], got {keep.dtype} {tuple(keep.shape)}")
    return SparseTensor(x.feats[keep], x.coords[keep], x.batch_size, check=False)
