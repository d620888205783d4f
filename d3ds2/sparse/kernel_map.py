"""Kernel maps: for each kernel offset, the (input row, output row) pairs a sparse convolution touches.

Built by packing coordinates into sorted int64 keys and looking neighbours up with ``searchsorted``
(the "sorted-hash" lookup); works identically on CPU and GPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .coords import MAX_COORD, lookup, pack_keys


@dataclass
class KernelMap:
    """Per-offset gather/scatter pairs.

    in_idx, out_idx: [P] int64 pairs of all offsets, concatenated in offset order.
    splits: number of pairs of each offset (len K), offset k's pairs are the k-th chunk.
    identity: index of an offset whose pairs are (i, i) for every row, or -1 (submanifold centre).
    num_out: number of output rows.
    """

    in_idx: torch.Tensor
    out_idx: torch.Tensor
    splits: list[int]
    identity: int
    num_out: int

    def pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = sum(self.splits[:k])
        end = start + self.splits[k]
        return self.in_idx[start:end], self.out_idx[start:end]

    def transposed(self, num_in: int) -> "KernelMap":
        """The map of the transposed convolution (outputs become inputs)."""
        return KernelMap(self.out_idx, self.in_idx, self.splits, self.identity, num_in)


def kernel_offsets(kernel_size: int, dilation: int = 1, centered: bool = True) -> torch.Tensor:
    """[K³, 3] offsets in weight order: index (ix * K + iy) * K + iz, offset i - K//2 when centered."""
    r = kernel_size // 2 if centered else 0
    grid = [(ix - r, iy - r, iz - r) for ix, iy, iz in itertools.product(range(kernel_size), repeat=3)]
    return torch.tensor(grid, dtype=torch.int64) * dilation


def submanifold_map(coords: torch.Tensor, keys: torch.Tensor, kernel_size: int, dilation: int = 1) -> KernelMap:
    """Map of a stride-1 submanifold conv: output sites = input sites, odd kernel centred on each site."""
    if kernel_size % 2 != 1:
        raise ValueError(f"submanifold convolution needs an odd kernel size, got {kernel_size}")
    offsets = kernel_offsets(kernel_size, dilation).to(coords.device)
    n = coords.shape[0]
    xyz = coords[:, 1:].long()
    rows = torch.arange(n, device=coords.device)
    ins, outs, splits = [], [], []
    centre = (kernel_size**3) // 2
    for k, off in enumerate(offsets):
        if k == centre:
            ins.append(rows)
            outs.append(rows)
            splits.append(n)
            continue
        nb = xyz + off  # output p reads input p + off
        ok = ((nb >= 0) & (nb <= MAX_COORD)).all(1)
        nb_keys = pack_keys(torch.cat([coords[:, :1].long(), nb.clamp(0, MAX_COORD)], 1))
        src = lookup(keys, nb_keys)
        hit = ok & (src >= 0)
        ins.append(src[hit])
        outs.append(rows[hit])
        splits.append(int(hit.sum()))
    return KernelMap(torch.cat(ins), torch.cat(outs), splits, centre, n)


def child_map(fine_keys: torch.Tensor, parent_coords: torch.Tensor, factor: int = 2) -> KernelMap:
    """Map of a stride-``factor`` conv with kernel ``factor``: output parent q reads child factor·q + c.

    Offsets c are ordered like :func:`kernel_offsets` (``centered=False``).
    """
    offsets = kernel_offsets(factor, centered=False).to(parent_coords.device)
    base = parent_coords[:, 1:].long() * factor
    rows = torch.arange(parent_coords.shape[0], device=parent_coords.device)
    ins, outs, splits = [], [], []
    for off in offsets:
        child = torch.cat([parent_coords[:, :1].long(), base + off], 1)
        src = lookup(fine_keys, pack_keys(child))
        hit = src >= 0
        ins.append(src[hit])
        outs.append(rows[hit])
        splits.append(int(hit.sum()))
    return KernelMap(torch.cat(ins), torch.cat(outs), splits, -1, parent_coords.shape[0])
