"""Per-sample sparse SDFs -> VAE batches: resampling to a training resolution, normalisation, collation.

Resampling to another resolution is the data-prep routine (``shard_format.sample_to_tensors``).
A sample (:class:`SDFSample`) holds every voxel of its occupied 8³ latent cells at resolution R:
coords [N, 3] int32, sdf [N] float32 in VOXEL units of R (negative inside), in_band [N] bool (the encoder's
input voxels, |sdf| < band), sharp [N] bool (near a sharp edge). The model sees the SDF normalised as
``clamp(sdf / sdf_scale, -1, 1)`` (``sdf_scale`` in voxels), the range of its tanh output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sparse import SparseTensor

CELL = 8  # fine voxels per latent cell per axis


@dataclass
class SDFSample:
    coords: torch.Tensor  # [N, 3] int32 fine voxel coords
    sdf: torch.Tensor  # [N] float32, voxel units of `resolution`
    in_band: torch.Tensor  # [N] bool
    sharp: torch.Tensor  # [N] bool
    resolution: int
    name: str = ""

    @property
    def num_input_voxels(self) -> int:
        return int(self.in_band.sum())

    def __len__(self) -> int:
        return self.coords.shape[0]

    @classmethod
    def from_arrays(cls, coords, sdf, in_band, sharp, resolution: int, name: str = "") -> "SDFSample":
        """Build from numpy arrays or tensors with the data shard keys; checks shapes."""
        c = torch.as_tensor(np.asarray(coords), dtype=torch.int32)
        n = c.shape[0]
        if c.dim() != 2 or c.shape[1] != 3:
            raise ValueError(f"sample {name!r}: coords must be [N, 3], got {tuple(c.shape)}")
        t = [torch.as_tensor(np.asarray(a)).reshape(-1) for a in (sdf, in_band, sharp)]
        for key, a in zip(("sdf", "in_band", "sharp"), t):
            if a.shape[0] != n:
                raise ValueError(f"sample {name!r}: {key} has {a.shape[0]} values for {n} voxels")
        return cls(c, t[0].float(), t[1].bool(), t[2].bool(), int(resolution), name)


def sample_at_resolution(sample: dict, resolution: int) -> SDFSample:
    """A decoded shard sample (``shard_format.decode_sample``) at ``resolution``: the stored SDF, or the
    trilinear resampling from a stored one (``shard_format.sample_to_tensors``)."""
    from .shard_format import sample_to_tensors

    t = sample_to_tensors(sample, resolution)
    return SDFSample(t["coords"].int(), t["sdf"].float(), t["in_band"].bool(), t["sharp"].bool(), resolution,
                     str(sample.get("key", "")))


class VAEBatch:
    """One VAE batch. inputs: in-band voxels [N_in, 1] (normalised SDF); targets: every voxel of the occupied
    cells, feats [N, 3] = (normalised sdf, in_band, sharp); resolution: the grid R; names: sample names.

    The loader worker only concatenates the samples; the voxel sort that makes ``inputs``/``targets`` sparse
    tensors runs on first access, after ``to(device)``, so on the GPU it costs milliseconds instead of the
    worker's seconds.
    """

    def __init__(self, parts: dict[str, torch.Tensor], batch_size: int, resolution: int, names: list[str]):
        self.parts = parts  # in_feats [N_in, 1], in_coords [N_in, 4], feats [N, 3], coords [N, 4]; unsorted
        self.batch_size, self.resolution, self.names = batch_size, resolution, names
        self._sorted: dict[str, SparseTensor] = {}

    def _sparse(self, prefix: str) -> SparseTensor:
        if prefix not in self._sorted:
            feats, coords = self.parts[prefix + "feats"], self.parts[prefix + "coords"]
            self._sorted[prefix] = SparseTensor.from_unsorted(feats, coords, self.batch_size)
        return self._sorted[prefix]

    @property
    def inputs(self) -> SparseTensor:
        return self._sparse("in_")

    @property
    def targets(self) -> SparseTensor:
        return self._sparse("")

    def to(self, device) -> "VAEBatch":
        async_copy = torch.device(device).type == "cuda"  # device-to-host copies stay blocking
        moved = {k: v.to(device, non_blocking=async_copy) for k, v in self.parts.items()}
        return VAEBatch(moved, self.batch_size, self.resolution, self.names)

    def pin_memory(self) -> "VAEBatch":
        return VAEBatch({k: v.pin_memory() for k, v in self.parts.items()}, self.batch_size, self.resolution,
                        self.names)

    @property
    def num_voxels(self) -> int:
        return self.parts["coords"].shape[0]


def normalise_sdf(sdf_vox: torch.Tensor, sdf_scale: float) -> torch.Tensor:
    """Voxel-unit SDF -> model range: clamp(sdf / sdf_scale, -1, 1)."""
    return (sdf_vox / sdf_scale).clamp(-1.0, 1.0)


def collate(samples: list[SDFSample], sdf_scale: float) -> VAEBatch:
    """Concatenate samples of one resolution into a :class:`VAEBatch` (batch index = list order)."""
    if not samples:
        raise ValueError("collate: empty batch")
    res = {s.resolution for s in samples}
    if len(res) != 1:
        raise ValueError(f"collate: samples have different resolutions {sorted(res)}")
    norm = [normalise_sdf(s.sdf, sdf_scale) for s in samples]
    rows = [torch.cat([torch.full_like(s.coords[:, :1], b), s.coords], 1) for b, s in enumerate(samples)]
    parts = {
        "in_feats": torch.cat([n[s.in_band, None] for n, s in zip(norm, samples)]),
        "in_coords": torch.cat([r[s.in_band] for r, s in zip(rows, samples)]),
        "feats": torch.cat([torch.stack([n, s.in_band.float(), s.sharp.float()], 1)
                            for n, s in zip(norm, samples)]),
        "coords": torch.cat(rows),
    }
    return VAEBatch(parts, len(samples), res.pop(), [s.name for s in samples])


# ---------------------------------------------------------------------------------------------------
# Analytic shapes (tests, benchmarks, smoke runs): exact SDFs in the [-1, 1] frame, world units.
def _sphere(p: torch.Tensor, radius: float = 0.6) -> torch.Tensor:
    return p.norm(dim=1) - radius


def _box(p: torch.Tensor, half: float = 0.5) -> torch.Tensor:
    q = p.abs() - half
    return q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)


def _torus(p: torch.Tensor, major: float = 0.55, minor: float = 0.2) -> torch.Tensor:
    ring = torch.stack([p[:, [0, 2]].norm(dim=1) - major, p[:, 1]], 1)
    return ring.norm(dim=1) - minor


def _box_edges(p: torch.Tensor, h: float, half: float = 0.5) -> torch.Tensor:
    """Voxels within 1.5 voxels of a box edge: two coordinates at the face offset."""
    return ((p.abs() - half).abs() < 1.5 * h).sum(1) >= 2


ANALYTIC_SHAPES = {"sphere": _sphere, "box": _box, "torus": _torus}


def analytic_sample(shape: str, resolution: int, band: float = 4.0, trunc: float = 7.9375, **params) -> SDFSample:
    """Sparse SDF sample of an analytic shape at ``resolution`` (the data-prep layout: all voxels of the
    8³ cells holding a voxel with |sdf| < band; sdf in voxel units clamped to ±trunc)."""
    if shape not in ANALYTIC_SHAPES:
        raise ValueError(f"unknown analytic shape {shape!r}; choose one of {sorted(ANALYTIC_SHAPES)}")
    fn = ANALYTIC_SHAPES[shape]
    h = 2.0 / resolution
    n_cells = resolution // CELL
    g = torch.arange(n_cells)
    cells = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    centre = -1.0 + (cells.double() * CELL + CELL / 2) * h
    near = fn(centre, **params).abs() <= (CELL / 2 * 3**0.5 + band) * h
    cells = cells[near]
    local = torch.stack(torch.meshgrid(*[torch.arange(CELL)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = (cells[:, None] * CELL + local[None]).reshape(-1, 3)
    pts = -1.0 + (coords.double() + 0.5) * h
    sdf = (fn(pts, **params) / h).float().view(-1, CELL**3)
    keep = (sdf.abs() < band).any(1)
    coords = coords.view(-1, CELL**3, 3)[keep].reshape(-1, 3).int()
    sdf = sdf[keep].reshape(-1)
    pts = -1.0 + (coords.double() + 0.5) * h
    sharp = _box_edges(pts, h, **params) & (sdf.abs() < 1.5) if shape == "box" else torch.zeros_like(sdf, dtype=torch.bool)
    return SDFSample(coords, sdf.clamp(-trunc, trunc), sdf.abs() < band, sharp, resolution, shape)
