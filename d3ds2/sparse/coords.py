"""Integer voxel coordinates: validation, packing into sortable int64 keys, and lookup.

Coordinates are int32 rows ``(batch, x, y, z)``. Each row packs into one int64 key
``batch << 48 | x << 32 | y << 16 | z`` whose numeric order is the lexicographic order of the rows, so
sorting keys sorts coordinates (batch first) and a neighbour lookup is a ``searchsorted``.
"""
from __future__ import annotations

import torch

COORD_BITS = 16
MAX_COORD = (1 << COORD_BITS) - 1  # x, y, z in [0, 65535]
MAX_BATCH = (1 << 15) - 1  # batch in [0, 32767] (the sign bit stays clear)


def pack_keys(coords: torch.Tensor) -> torch.Tensor:
    """[N, 4] int (batch, x, y, z) -> [N] int64 keys ordered like the rows."""
    c = coords.long()
    return (c[:, 0] << 48) | (c[:, 1] << 32) | (c[:, 2] << 16) | c[:, 3]


def validate_coords(coords: torch.Tensor, num_feats: int | None = None, name: str = "coords") -> None:
    """Raise a clear error for coords that the sparse ops cannot take.

    Checks dtype (int32), shape [N, 4], range (0 <= x, y, z <= 65535, 0 <= batch <= 32767) and, when
    ``num_feats`` is given, that coords and feats have the same number of rows.
    """
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 [N, 4], got {type(coords).__name__}")
    if coords.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (batch, x, y, z) rows, got {coords.dtype}; use coords.int()")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] = (batch, x, y, z), got {tuple(coords.shape)}")
    if num_feats is not None and coords.shape[0] != num_feats:
        raise ValueError(f"{name} has {coords.shape[0]} rows but feats has {num_feats}: they must match")
    if coords.shape[0] == 0:
        return
    lo = coords.amin(dim=0)
    hi = coords.amax(dim=0)
    if bool((lo < 0).any()):
        raise ValueError(
            f"{name} has negative entries (min per column {lo.tolist()}); shift the grid so that every "
            "coordinate is >= 0 (e.g. coords[:, 1:] -= coords[:, 1:].min(0).values)"
        )
    if int(hi[0]) > MAX_BATCH or bool((hi[1:] > MAX_COORD).any()):
        raise ValueError(f"{name} exceeds the supported range (batch <= {MAX_BATCH}, xyz <= {MAX_COORD}): {hi.tolist()}")


def is_sorted_unique(keys: torch.Tensor) -> tuple[bool, bool]:
    """(sorted ascending, free of duplicates) for a 1-D key tensor."""
    if keys.numel() < 2:
        return True, True
    d = keys[1:] - keys[:-1]
    return bool((d >= 0).all()), bool((d != 0).all())


def lookup(sorted_keys: torch.Tensor, query_keys: torch.Tensor) -> torch.Tensor:
    """Index of each query key in ``sorted_keys`` or -1 where it is absent. [M] int64."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query_keys, -1)
    idx = torch.searchsorted(sorted_keys, query_keys)
    idx_c = idx.clamp_max(sorted_keys.numel() - 1)
    found = sorted_keys[idx_c] == query_keys
    return torch.where(found, idx_c, torch.full_like(idx_c, -1))


def batch_offsets(batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Start of each sample in a batch-sorted column, [batch_size + 1] int64 (a cu_seqlens)."""
    ids = torch.arange(batch_size + 1, device=batch.device, dtype=batch.dtype)
    return torch.searchsorted(batch.contiguous(), ids).long()
