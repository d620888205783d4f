"""Kernel maps: for each kernel offset, the (input row, output row) pairs a sparse convolution touches.

Built by packing coordinates into sorted int64 keys and looking neighbours up with ``searchsorted``
(the "sorted-hash" lookup); works identically on CPU and GPU.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

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
    _table: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def neighbor_table(self) -> torch.Tensor:
        """[K, num_out] int32 table: input row that output o reads through offset k, or -1; cached.

        Valid for maps in which each (offset, output) has at most one input (submanifold, child and
        transposed child maps).
        """
        if self._table is None:
            dev = self.out_idx.device
            k = len(self.splits)
            kid = torch.repeat_interleave(torch.arange(k, device=dev), torch.tensor(self.splits, device=dev))
            table = torch.full((k * self.num_out,), -1, dtype=torch.int32, device=dev)
            table[kid * self.num_out + self.out_idx] = self.in_idx.int()
            self._table = table.view(k, self.num_out)
        return self._table

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


def submanifold_table(coords: torch.Tensor, keys: torch.Tensor, kernel_size: int, dilation: int = 1) -> torch.Tensor:
    """[K³, N] int32 neighbour table of a stride-1 submanifold conv: row p + offset_k of each site p, or -1.

    Same offsets and order as :func:`submanifold_map` (``table[k]`` holds its k-th pairs as
    ``table[k, out] = in``), built without host syncs. With dilation 1 it binary-searches once per
    (x, y) column offset (k² lookups instead of k³): sites of one column are consecutive in key order,
    so the k z-neighbours lie within k entries of the lower bound of the lowest one. On CUDA that
    search runs as one Triton kernel (``d3ds2.kernels.sparse_conv.subm_table``); this is its reference.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"submanifold convolution needs an odd kernel size, got {kernel_size}")
    if dilation == 1 and coords.is_cuda:
        from d3ds2.kernels.runtime import auto_triton
        from d3ds2.kernels.sparse_conv import subm_table

        if auto_triton(coords, "submanifold neighbour table"):
            return subm_table(keys, kernel_size)
    n, dev, r = coords.shape[0], coords.device, kernel_size // 2
    offsets = kernel_offsets(kernel_size, dilation).to(dev)  # [K, 3]
    if n == 0:
        return torch.empty(kernel_size**3, 0, dtype=torch.int32, device=dev)
    c = coords.long()
    if dilation != 1:
        nb = c[None, :, 1:] + offsets[:, None, :]  # [K, N, 3]
        ok = ((nb >= 0) & (nb <= MAX_COORD)).all(-1)
        q = torch.cat([c[None, :, :1].expand(offsets.shape[0], -1, -1), nb.clamp(0, MAX_COORD)], -1)
        src = lookup(keys, pack_keys(q.view(-1, 4)).view(offsets.shape[0], n))
        return torch.where(ok, src, -1).int()
    cols = offsets.view(kernel_size**2, kernel_size, 3)[:, 0, :2]  # [k², 2] (dx, dy) of each column
    xy = c[None, :, 1:3] + cols[:, None, :]  # [k², N, 2]
    col_ok = ((xy >= 0) & (xy <= MAX_COORD)).all(-1)
    bxy = torch.cat([c[None, :, :1].expand(cols.shape[0], -1, -1), xy.clamp(0, MAX_COORD)], -1)
    col_key = pack_keys(torch.cat([bxy, torch.zeros_like(bxy[..., :1])], -1).view(-1, 4)).view(cols.shape[0], n)
    z = c[:, 3]
    lower = torch.searchsorted(keys, col_key + (z - r).clamp_min(0))  # [k², N] first site at or above z - r
    cand_pos = (lower[:, None, :] + torch.arange(kernel_size, device=dev)[None, :, None]).clamp_max(n - 1)
    cand = keys[cand_pos]  # [k², k, N]
    table = torch.full((cols.shape[0], kernel_size, n), -1, dtype=torch.int64, device=dev)
    for j in range(kernel_size):  # target z + j - r lies at most j entries after the lower bound
        zt = z + (j - r)
        ok = col_ok & (zt >= 0) & (zt <= MAX_COORD)
        match = cand[:, : j + 1] == (col_key + zt)[:, None, :]
        hit = ok & match.any(1)
        pos = cand_pos[:, : j + 1].gather(1, match.int().argmax(1, keepdim=True)).squeeze(1)
        table[:, j] = torch.where(hit, pos, -1)
    return table.view(kernel_size**3, n).int()


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
