"""``SparseTensor``: a batch of sparse voxel grids, the one type every sparse module takes and returns."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .coords import batch_offsets, is_sorted_unique, pack_keys, validate_coords
from .serialize import Partition, block_sort, window_partition


class SparseTensor:
    """Features on the occupied voxels of a batch of grids.

    Args:
        feats: [N, C] (or [N, ...]) features, one row per voxel.
        coords: [N, 4] int32 rows (batch, x, y, z), sorted lexicographically and unique (batch is the
            primary key, so each sample's voxels are contiguous). Use :meth:`from_unsorted` for other
            orders or duplicates.
        batch_size: number of samples B; defaults to max(batch) + 1. Give it explicitly when trailing
            samples may be empty.
        check: validate dtype, shape, range, order and uniqueness (one host sync). Ops that produce
            coords in canonical order pass False.
        cache: shared per-coordinate-set cache (kernel maps, window partitions, block layouts). It follows
            :meth:`replace` as long as the coords stay the same.
    """

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        *,
        check: bool = True,
        cache: dict | None = None,
    ) -> None:
        if check:
            if not isinstance(feats, torch.Tensor):
                raise TypeError(f"feats must be a torch.Tensor [N, C], got {type(feats).__name__}")
            if feats.dim() < 1:
                raise ValueError("feats must have a leading voxel dimension [N, ...]")
            validate_coords(coords, feats.shape[0])
            if coords.device != feats.device:
                raise ValueError(f"coords are on {coords.device} but feats on {feats.device}")
            keys = pack_keys(coords)
            ordered, unique = is_sorted_unique(keys)
            if not ordered:
                raise ValueError(
                    "coords are not sorted by (batch, x, y, z); build with SparseTensor.from_unsorted(feats, coords)"
                )
            if not unique:
                raise ValueError(
                    "coords contain duplicate voxels; merge them with SparseTensor.from_unsorted(feats, coords, reduce='mean')"
                )
            if batch_size is not None and coords.shape[0] and int(coords[-1, 0]) >= batch_size:
                raise ValueError(f"coords hold batch index {int(coords[-1, 0])} but batch_size is {batch_size}")
        self.feats = feats
        self.coords = coords
        if batch_size is None:
            batch_size = int(coords[-1, 0]) + 1 if coords.shape[0] else 1
        self.batch_size = batch_size
        self.cache: dict[Any, Any] = {} if cache is None else cache

    # ----------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_unsorted(
        cls,
        feats: torch.Tensor,
        coords: torch.Tensor,
        batch_size: int | None = None,
        reduce: str | None = None,
    ) -> "SparseTensor":
        """Sort coords (and feats with them); merge duplicates with ``reduce`` ('mean', 'sum', 'max').

        Without ``reduce``, duplicate coordinates raise an error.
        """
        validate_coords(coords, feats.shape[0])
        keys = pack_keys(coords)
        sorted_keys, order = torch.sort(keys)
        if not (sorted_keys[1:] == sorted_keys[:-1]).any():  # one sort when there is no duplicate
            out = cls(feats[order], coords[order], batch_size, check=False)
            out.cache["keys"] = sorted_keys
            return out
        ukeys, inverse = torch.unique(keys, return_inverse=True)
        if reduce is None:
            raise ValueError(
                f"coords contain {keys.numel() - ukeys.numel()} duplicate voxels; pass reduce='mean'|'sum'|'max'"
            )
        if reduce not in ("mean", "sum", "max"):
            raise ValueError(f"unknown reduce {reduce!r}; use 'mean', 'sum' or 'max'")
        out = feats.new_zeros((ukeys.numel(),) + feats.shape[1:])
        idx = inverse.view(-1, *([1] * (feats.dim() - 1))).expand_as(feats)
        out = out.scatter_reduce(0, idx, feats, reduce="amax" if reduce == "max" else reduce, include_self=False)
        first = torch.zeros(ukeys.numel(), dtype=torch.long, device=keys.device)
        first.scatter_(0, inverse, torch.arange(keys.numel(), device=keys.device))
        return cls(out, coords[first], batch_size, check=False)

    @classmethod
    def from_samples(cls, feats: Sequence[torch.Tensor], coords: Sequence[torch.Tensor]) -> "SparseTensor":
        """Batch per-sample (feats [Ni, C], xyz coords [Ni, 3]) pairs; samples may be empty or unsorted."""
        if len(feats) != len(coords):
            raise ValueError(f"got {len(feats)} feature tensors but {len(coords)} coordinate tensors")
        rows = []
        for b, c in enumerate(coords):
            if c.dim() != 2 or c.shape[1] != 3:
                raise ValueError(f"sample {b}: xyz coords must be [N, 3], got {tuple(c.shape)}")
            rows.append(torch.cat([torch.full_like(c[:, :1], b), c], dim=1).int())
        return cls.from_unsorted(torch.cat(list(feats)), torch.cat(rows), batch_size=len(coords))

    # ----------------------------------------------------------------------------------------------
    # properties
    @property
    def keys(self) -> torch.Tensor:
        """[N] int64 packed coordinate keys (sorted ascending); cached."""
        if "keys" not in self.cache:
            self.cache["keys"] = pack_keys(self.coords)
        return self.cache["keys"]

    @property
    def offsets(self) -> torch.Tensor:
        """[B + 1] int64 start of each sample (cu_seqlens); cached."""
        if "offsets" not in self.cache:
            self.cache["offsets"] = batch_offsets(self.coords[:, 0], self.batch_size)
        return self.cache["offsets"]

    @property
    def layout(self) -> list[slice]:
        """One slice of rows per sample."""
        o = self.offsets.tolist()
        return [slice(o[i], o[i + 1]) for i in range(self.batch_size)]

    @property
    def counts(self) -> torch.Tensor:
        """[B] int64 number of voxels per sample."""
        return self.offsets.diff()

    @property
    def batch_ids(self) -> torch.Tensor:
        """[N] int64 sample index of each voxel."""
        return self.coords[:, 0].long()

    @property
    def shape(self) -> torch.Size:
        return self.feats.shape

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"SparseTensor(voxels={self.num_voxels}, batch={self.batch_size}, feats={tuple(self.feats.shape)}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # ----------------------------------------------------------------------------------------------
    # derivation
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> "SparseTensor":
        """Same voxels with new feats (the cache is shared), or a new voxel set (fresh cache)."""
        if coords is None:
            if feats.shape[0] != self.num_voxels:
                raise ValueError(f"replace: feats has {feats.shape[0]} rows, the tensor has {self.num_voxels} voxels")
            return SparseTensor(feats, self.coords, self.batch_size, check=False, cache=self.cache)
        return SparseTensor(feats, coords, self.batch_size, check=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Return ``cache[key]``, building it once with ``build()``."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def block_layout(self, block_size: int) -> "Partition":
        """SSA block order of the voxels (see :func:`serialize.block_sort`); cached."""
        return self.cached(("block_layout", block_size), lambda: block_sort(self.coords, block_size, self.batch_size))

    def window_layout(self, window: int, shift: int = 0) -> "Partition":
        """Window partition of the voxels (see :func:`serialize.window_partition`); cached."""
        return self.cached(
            ("window_layout", window, shift), lambda: window_partition(self.coords, window, shift, self.batch_size)
        )

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Move to a device and/or cast feats (coords stay int32); the cache moves only if the device stays."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.feats.device:
            return self.replace(feats)
        return SparseTensor(feats, self.coords.to(feats.device), self.batch_size, check=False)

    def type(self, dtype: torch.dtype) -> "SparseTensor":
        return self.replace(self.feats.to(dtype))

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [Ni, C], xyz coords [Ni, 3]) of sample i."""
        s = self.layout[i]
        return self.feats[s], self.coords[s, 1:]

    def unbind(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.sample(i) for i in range(self.batch_size)]

    def dense(self, resolution: int | Sequence[int]) -> torch.Tensor:
        """Scatter into a dense [B, C, X, Y, Z] grid (zeros elsewhere); for tests and small grids."""
        res = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
        feats = self.feats.reshape(self.num_voxels, -1)
        out = feats.new_zeros(self.batch_size, *res, feats.shape[1])
        c = self.coords.long()
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = feats
        return out.permute(0, 4, 1, 2, 3).contiguous()

    # ----------------------------------------------------------------------------------------------
    # arithmetic on feats (same voxel set or broadcastable tensors)
    def _other(self, other: Any) -> Any:
        if isinstance(other, SparseTensor):
            if other.coords is not self.coords and (
                other.num_voxels != self.num_voxels or not torch.equal(other.coords, self.coords)
            ):
                raise ValueError("element-wise op between SparseTensors with different voxel sets")
            return other.feats
        return other

    def __add__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats + self._other(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats - self._other(other))

    def __mul__(self, other: Any) -> "SparseTensor":
        return self.replace(self.feats * self._other(other))

    __rmul__ = __mul__

    def __neg__(self) -> "SparseTensor":
        return self.replace(-self.feats)
