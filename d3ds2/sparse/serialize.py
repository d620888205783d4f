"""Orders of sparse voxels: space-filling curves, window partitions and the per-sample block sort of SSA.

Every order keeps the batch index as its primary key, so each sample's voxels stay contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .coords import batch_offsets, pack_keys

CURVE_BITS = 16


def _spread_bits(v: torch.Tensor, bits: int = CURVE_BITS) -> torch.Tensor:
    """Insert two zero bits after each of the low ``bits`` bits of v (int64)."""
    out = torch.zeros_like(v)
    for i in range(bits):
        out |= ((v >> i) & 1) << (3 * i)
    return out


def zorder_code(xyz: torch.Tensor) -> torch.Tensor:
    """Morton (z-order) code of [N, 3] non-negative coords < 2**16, x most significant. [N] int64."""
    v = xyz.long()
    return (_spread_bits(v[:, 0]) << 2) | (_spread_bits(v[:, 1]) << 1) | _spread_bits(v[:, 2])


def hilbert_code(xyz: torch.Tensor, bits: int = CURVE_BITS) -> torch.Tensor:
    """3-D Hilbert index of [N, 3] non-negative coords < 2**bits (Skilling's transpose method). [N] int64."""
    x = [xyz[:, i].long().clone() for i in range(3)]
    q = 1 << (bits - 1)
    while q > 1:  # inverse undo of the excess work
        p = q - 1
        for i in range(3):
            hit = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0_flip = x[0] ^ p
            x0_swap = x[0] ^ t
            xi_swap = x[i] ^ t
            if i == 0:
                x[0] = torch.where(hit, x0_flip, x[0])
            else:
                x[0] = torch.where(hit, x0_flip, x0_swap)
                x[i] = torch.where(hit, x[i], xi_swap)
        q >>= 1
    x[1] ^= x[0]  # Gray encode
    x[2] ^= x[1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    return (_spread_bits(x[0], bits) << 2) | (_spread_bits(x[1], bits) << 1) | _spread_bits(x[2], bits)


CURVES = {"zorder": zorder_code, "hilbert": hilbert_code}


def curve_order(coords: torch.Tensor, curve: str = "zorder") -> torch.Tensor:
    """Permutation [N] that sorts (batch, x, y, z) rows by batch, then along a space-filling curve."""
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}; choose one of {sorted(CURVES)}")
    code = CURVES[curve](coords[:, 1:])
    order = torch.argsort(code, stable=True)
    return order[torch.argsort(coords[order, 0], stable=True)]


@dataclass
class Partition:
    """Tokens grouped into contiguous segments (windows or blocks).

    perm: [N] int64, grouped = x[perm]; inverse: [N] int64, x = grouped[inverse].
    offsets: [S + 1] int32 start of each segment in grouped order (a cu_seqlens for varlen attention).
    segment_coords: [S, 4] int32 (batch, sx, sy, sz) of each segment, ascending.
    segment_of_token: [N] int64 segment index of each grouped token.
    sample_segment_offsets: [B + 1] int32 first segment of each sample.
    sample_token_offsets: [B + 1] int32 first token of each sample.
    max_len: largest segment.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    segment_coords: torch.Tensor
    segment_of_token: torch.Tensor
    sample_segment_offsets: torch.Tensor
    sample_token_offsets: torch.Tensor
    max_len: int


def _partition(coords: torch.Tensor, cell: torch.Tensor, inner: torch.Tensor | None, batch_size: int) -> Partition:
    """Group tokens by (batch, cell) ascending, ordered by ``inner`` within a cell (stable)."""
    keys = pack_keys(torch.cat([coords[:, :1], cell], dim=1))
    perm = torch.argsort(inner, stable=True) if inner is not None else torch.arange(len(keys), device=keys.device)
    perm = perm[torch.argsort(keys[perm], stable=True)]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    seg_keys, counts = torch.unique_consecutive(keys[perm], return_counts=True)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=coords.device)
    offsets[1:] = counts.cumsum(0)
    seg_coords = torch.stack(
        [seg_keys >> 48, (seg_keys >> 32) & 0xFFFF, (seg_keys >> 16) & 0xFFFF, seg_keys & 0xFFFF], 1
    ).int()
    return Partition(
        perm=perm,
        inverse=inverse,
        offsets=offsets,
        segment_coords=seg_coords,
        segment_of_token=torch.repeat_interleave(torch.arange(counts.numel(), device=coords.device), counts),
        sample_segment_offsets=batch_offsets(seg_coords[:, 0], batch_size).int(),
        sample_token_offsets=batch_offsets(coords[perm, 0], batch_size).int(),
        max_len=int(counts.max()) if counts.numel() else 0,
    )


def window_partition(coords: torch.Tensor, window: int, shift: int = 0, batch_size: int | None = None) -> Partition:
    """Non-overlapping ``window``³ cubes after shifting coords by ``shift`` on every axis.

    Window of voxel p is (p + shift) // window; tokens keep their input order inside a window.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    bs = batch_size if batch_size is not None else (int(coords[:, 0].max()) + 1 if len(coords) else 1)
    cell = torch.div(coords[:, 1:] + shift, window, rounding_mode="floor")
    return _partition(coords, cell, None, bs)


def block_sort(coords: torch.Tensor, block_size: int, batch_size: int | None = None) -> Partition:
    """SSA's block order: key (batch, x//m, y//m, z//m, x%m, y%m, z%m) with m = ``block_size``.

    The tokens of one m³ block are contiguous and blocks come in ascending (bx, by, bz) order within
    each sample. ``segment_*`` fields describe the occupied blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bs = batch_size if batch_size is not None else (int(coords[:, 0].max()) + 1 if len(coords) else 1)
    xyz = coords[:, 1:].long()
    cell = torch.div(xyz, block_size, rounding_mode="floor")
    r = xyz - cell * block_size
    inner = (r[:, 0] * block_size + r[:, 1]) * block_size + r[:, 2]
    return _partition(coords, cell.int(), inner, bs)
