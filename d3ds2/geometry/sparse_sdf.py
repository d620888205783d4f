"""Sparse signed distance fields near a watertight surface, at any resolution R (a multiple of 8).

Grid: voxel i (per axis) of resolution R is centred at x = -1 + (i + 0.5) * 2 / R; voxel size h = 2 / R.
Latent cells are 8^3 voxels: cell c holds voxels 8c .. 8c+7 per axis.

A `SparseSDF` holds the occupied cells (those containing a voxel centre with |sdf| < `band` voxels) and
the SDF of every voxel of those cells as a dense [M, 8, 8, 8] block (local index order x, y, z), in VOXEL
units of its grid (distance / h), negative inside, clamped to [-trunc, trunc] (exact where |sdf| < trunc).

Algorithm (`compute_sparse_sdf`): Embree closest-point queries (open3d RaycastingScene) with
coarse-to-fine culling: blocks of 2^k cells are kept only where the distance at the block centre is below
the half diagonal of the block's voxel centres plus the band (the distance is 1-Lipschitz, so no occupied
cell is lost); inside the surviving cells the same bound works on 4^3 and 2^3 sub-blocks (`_cells_sdf`):
blocks whose centre is farther than their radius get one sign (ray parity on the watertight surface,
`nsamples` rays) for all their voxels, blocks beyond trunc are clamped without further queries, and only
voxels closer than trunc get their own distance query (and their own parity test only within about a
voxel of the surface). No dense R^3 array is ever allocated. An open mesh bounding a solid is signed by its
winding number instead (`query=winding.WindingSign`): a block then takes its centre's sign only where the
winding number cannot reach 0.5 inside it (`_block_sign`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from d3ds2.fallbacks import warn_fallback

CELL = 8  # fine voxels per latent cell (per axis)
_LOCAL = np.stack(np.meshgrid(*[np.arange(CELL)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [512, 3]


@dataclass
class SparseSDF:
    """cells [M, 3] int32 (fine coord // 8), sdf [M, 8, 8, 8] float32 voxel units, at `resolution`."""

    resolution: int
    cells: np.ndarray
    sdf: np.ndarray
    band: float
    trunc: float

    def voxels(self) -> tuple[np.ndarray, np.ndarray]:
        """All voxels of the occupied cells: coords [M*512, 3] int32 (fine), sdf [M*512] float32."""
        return cell_voxel_coords(self.cells), self.sdf.reshape(-1)


def voxel_centres(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Integer voxel coords [..., 3] -> centre positions in [-1, 1]^3 (float32)."""
    return (-1.0 + (np.asarray(coords, np.float64) + 0.5) * (2.0 / resolution)).astype(np.float32)


def cell_voxel_coords(cells: np.ndarray) -> np.ndarray:
    """cells [M, 3] -> the fine coords of their voxels [M*512, 3] int32, block order (x, y, z)."""
    return (np.asarray(cells, np.int32)[:, None, :] * CELL + _LOCAL[None].astype(np.int32)).reshape(-1, 3)


class SurfaceDistance:
    """Unsigned/signed distance queries against a triangle mesh (Embree BVH via open3d)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, nsamples: int = 3):
        import open3d as o3d

        self._o3d = o3d
        self.nsamples = nsamples
        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(
            o3d.core.Tensor(np.ascontiguousarray(vertices, np.float32)),
            o3d.core.Tensor(np.ascontiguousarray(faces, np.uint32)),
        )

    def unsigned(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> distance [N] float32 (world units)."""
        return self.scene.compute_distance(np.ascontiguousarray(points, np.float32)).numpy()

    def signed(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> signed distance [N] float32, negative inside (needs a watertight mesh)."""
        pts = np.ascontiguousarray(points, np.float32)
        return self.scene.compute_signed_distance(pts, nsamples=self.nsamples).numpy()

    def inside(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> bool [N], True inside (ray parity)."""
        pts = np.ascontiguousarray(points, np.float32)
        return self.scene.compute_occupancy(pts, nsamples=self.nsamples).numpy() > 0.5


def surface_distance(vertices: np.ndarray, faces: np.ndarray, nsamples: int = 3, backend: str = "auto",
                     device: str | None = None):
    """The distance/inside query object of a mesh. backend: `open3d` (Embree, CPU), `torch`
    (`TorchSurfaceDistance`, CUDA when available, else CPU; for machines without open3d) or `auto`
    (open3d when it imports, else torch with a one-time warning: on a CPU that is ~20x slower than Embree)."""
    if backend not in ("auto", "open3d", "torch"):
        raise ValueError(f"sdf backend {backend!r}: expected auto, open3d or torch")
    missing = None
    if backend == "auto":
        try:
            import open3d  # noqa: F401

            backend = "open3d"
        except ImportError as e:
            backend, missing = "torch", e
    if backend == "open3d":
        return SurfaceDistance(vertices, faces, nsamples)
    from d3ds2.geometry.torch_distance import TorchSurfaceDistance

    query = TorchSurfaceDistance(vertices, faces, nsamples, device=device)
    if missing is not None:
        where = "the GPU" if query.device.type == "cuda" else "the CPU, about 20x slower than open3d's Embree"
        warn_fallback("sdf-open3d", f"sdf.backend=auto: open3d cannot be imported ({missing}), so distance "
                                    f"queries run on the PyTorch backend on {where}. Fix: pip install open3d (on "
                                    f"Linux it also needs libusb-1.0 and libgomp), or set sdf.backend=torch to "
                                    f"choose that backend knowingly")
    return query


def candidate_cells(query: SurfaceDistance, resolution: int, band: float) -> np.ndarray:
    """Coarse-to-fine culling: cells [K, 3] int32 that may hold a voxel centre within `band` voxels."""
    if resolution % CELL:
        raise ValueError(f"resolution {resolution} must be a multiple of {CELL}")
    n_cells = resolution // CELL
    h = 2.0 / resolution
    level_cells = 1  # cells per block side at the current level
    while level_cells * 2 <= n_cells and n_cells // (level_cells * 2) >= 4:
        level_cells *= 2
    side = -(-n_cells // level_cells)
    blocks = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    children = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    while True:
        size = level_cells * CELL  # voxels per block side
        lo = blocks * size
        hi = np.minimum(lo + size, resolution)  # exclusive
        centre = -1.0 + (lo + hi) / 2 * h  # centre of the voxel-centre box
        half_diag = np.linalg.norm((hi - lo - 1) / 2 * h, axis=1)
        keep = query.unsigned(centre) <= half_diag + band * h
        blocks = blocks[keep]
        if level_cells == 1:
            return blocks.astype(np.int32)
        level_cells //= 2
        blocks = (blocks[:, None, :] * 2 + children[None]).reshape(-1, 3)
        blocks = blocks[(blocks * level_cells < n_cells).all(axis=1)]


def _block_centres(cells: np.ndarray, size: int, resolution: int) -> np.ndarray:
    """[M, (8/size)^3, 3] centres of the size^3 sub-blocks of each cell (mean of their voxel centres), order x, y, z."""
    per = CELL // size
    sub = np.stack(np.meshgrid(*[np.arange(per)] * 3, indexing="ij"), -1).reshape(-1, 3)
    first = cells[:, None, :].astype(np.float64) * CELL + sub[None] * size  # first voxel of each block
    return (-1.0 + (first + size / 2.0) * (2.0 / resolution)).astype(np.float32)


def _block_of_voxel(size: int) -> np.ndarray:
    """[512] index of the size^3 sub-block holding each local voxel of a cell (both in order x, y, z)."""
    per = CELL // size
    b = _LOCAL // size
    return (b[:, 0] * per + b[:, 1]) * per + b[:, 2]


_IN4, _IN2 = _block_of_voxel(4), _block_of_voxel(2)
_SUB2_IN4 = _IN4[np.unique(_IN2, return_index=True)[1]]  # [64] 4^3 block holding each 2^3 block
_RAD4, _RAD2 = 1.5 * np.sqrt(3.0), 0.5 * np.sqrt(3.0)  # voxels: block centre to each of its voxel centres
_EPS = 0.01  # voxels: margin on the Lipschitz tests for float32 rounding


def _sign(query: SurfaceDistance, points: np.ndarray) -> np.ndarray:
    """points [N, 3] -> float32 [N]: -1 inside, +1 outside."""
    return np.where(query.inside(points), np.float32(-1.0), np.float32(1.0)) if len(points) else np.zeros(0, np.float32)


def _block_sign(query, centres: np.ndarray, radius: float, dist: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Block centres [N, 3] whose distance `dist` [N] (voxels) exceeds their `radius` (voxels) -> (sign [N] of the
    centre, sure [N]: it holds for every voxel of the block). Ray parity is constant in a surface-free ball, so it
    is always sure; a query with `block_inside` (winding numbers, which may cross 0.5 in free space) says."""
    if hasattr(query, "block_inside") and len(centres):
        inside, sure = query.block_inside(centres, radius * h, dist * h)
        return np.where(inside, np.float32(-1.0), np.float32(1.0)), sure
    return _sign(query, centres), np.ones(len(centres), bool)


def _cells_sdf(query: SurfaceDistance, cells: np.ndarray, resolution: int, band: float,
               trunc: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate cells [M, 3] -> (occupied bool [M], sdf float32 [K, 512] of the K occupied ones, voxel units).

    Queries are as coarse as the 1-Lipschitz bound allows (d = unsigned distance in voxels). A 4^3 block whose
    centre has d4 > _RAD4 lies in a surface-free ball: one sign test signs all its voxels (when `_block_sign`
    is sure of it), and when d4 - _RAD4 >= trunc they are all clamped. Inside the other 4^3 blocks the same
    holds for 2^3 blocks (_RAD2). The remaining voxels get their own distance d; their sign is their 2^3
    centre's when d + d2 > _RAD2 (the segment between them cannot cross the surface) and that sign is sure,
    else their own sign test.
    """
    h = 2.0 / resolution
    d4 = query.unsigned(_block_centres(cells, 4, resolution).reshape(-1, 3)).reshape(-1, 8) / h
    occupied = (d4 - _RAD4 < band).any(axis=1)
    cells, d4 = cells[occupied], d4[occupied]
    M = len(cells)
    uni4 = d4 > _RAD4 + _EPS  # one sign for the whole 4^3 block
    s4 = np.zeros((M, 8), np.float32)
    s4[uni4], sure4 = _block_sign(query, _block_centres(cells, 4, resolution)[uni4], _RAD4 + _EPS, d4[uni4], h)
    uni4[uni4] = sure4
    open4 = d4 - _RAD4 < trunc  # holds voxels closer than trunc
    open2 = open4[:, _SUB2_IN4]  # [M, 64]
    c2 = _block_centres(cells, 2, resolution)
    d2 = np.full((M, 64), np.inf, np.float32)
    d2[open2] = query.unsigned(c2[open2]) / h
    s2 = np.zeros((M, 64), np.float32)
    sure2 = np.ones((M, 64), bool)
    need_s2 = ~uni4[:, _SUB2_IN4]
    # a 2^3 centre is 1 voxel per axis from its 4^3 centre: d4 - sqrt(3) bounds the distance of those not queried
    d2_low = np.where(open2, d2, d4[:, _SUB2_IN4] - np.sqrt(3.0))
    s2[need_s2], sure2[need_s2] = _block_sign(query, c2[need_s2], _RAD2 + _EPS, d2_low[need_s2], h)
    D4, D2 = d4[:, _IN4], d2[:, _IN2]  # per voxel [M, 512]
    sign = np.where(uni4[:, _IN4], s4[:, _IN4], s2[:, _IN2])
    unsure = ~uni4[:, _IN4] & ~sure2[:, _IN2]  # voxels whose block signs are not enough
    exact = (D4 - _RAD4 < trunc) & (D2 - _RAD2 < trunc)
    rows, local = np.nonzero(exact)
    pts = voxel_centres(cells[rows] * CELL + _LOCAL[local], resolution)
    d = query.unsigned(pts) / h
    own = (~uni4[rows, _IN4[local]] & (d + D2[rows, local] <= _RAD2 + _EPS)) | unsure[rows, local]
    s = sign[rows, local]
    s[own] = _sign(query, pts[own])
    far = np.nonzero(unsure & ~exact)  # clamped voxels of unsure blocks (winding numbers only)
    if len(far[0]):
        sign[far] = _sign(query, voxel_centres(cells[far[0]] * CELL + _LOCAL[far[1]], resolution))
    sdf = sign * np.float32(trunc)
    sdf[rows, local] = np.clip(s * d, -trunc, trunc)
    return occupied, sdf


def compute_sparse_sdf(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int,
    band: float = 4.0,
    trunc: float = 7.9375,
    chunk_cells: int = 4096,
    nsamples: int = 3,
    query: SurfaceDistance | None = None,
) -> SparseSDF:
    """Sparse SDF of a watertight mesh (vertices [V,3] in [-1,1]^3, faces [F,3]) at `resolution`."""
    if trunc < band:
        raise ValueError(f"trunc ({trunc}) must be >= band ({band})")
    query = query or surface_distance(vertices, faces, nsamples)
    cand = candidate_cells(query, resolution, band)
    kept_cells, kept_sdf = [], []
    for start in range(0, len(cand), chunk_cells):
        cells = cand[start : start + chunk_cells]
        candidate, sdf = _cells_sdf(query, cells, resolution, band, trunc)
        occupied = (np.abs(sdf) < band).any(axis=1)  # the 4^3 test keeps a superset
        kept_cells.append(cells[candidate][occupied])
        kept_sdf.append(sdf[occupied].reshape(-1, CELL, CELL, CELL))
    cells = np.concatenate(kept_cells) if kept_cells else np.zeros((0, 3), np.int32)
    sdf = np.concatenate(kept_sdf) if kept_sdf else np.zeros((0, CELL, CELL, CELL), np.float32)
    return SparseSDF(resolution, cells.astype(np.int32), sdf, band, trunc)


def sparse_sdf_of_mesh(mesh: trimesh.Trimesh, resolution: int, **kw) -> SparseSDF:
    return compute_sparse_sdf(np.asarray(mesh.vertices), np.asarray(mesh.faces), resolution, **kw)


def _linear_keys(coords: np.ndarray, resolution: int) -> np.ndarray:
    c = np.asarray(coords, np.int64)
    return (c[..., 0] * resolution + c[..., 1]) * resolution + c[..., 2]


def resample_sparse_sdf(src: SparseSDF, resolution: int, band: float | None = None) -> SparseSDF:
    """Trilinear resampling of a stored sparse SDF to another resolution (values converted to the new voxel units).

    Target voxels whose 8 source neighbours are partly missing use the present ones (renormalised weights);
    voxels with none present take +-trunc with the sign of the nearest resolved voxel of their cell.
    Only voxels within src.band of the surface are guaranteed stored, so the exact range becomes
    (src.band - 1) * R1 / R0 target voxels: the returned band is min(band, that) (3 voxels for 512 -> 384,
    1.5 for 512 -> 256), so `|sdf| < band` stays exact. Store the training resolutions for full bands.
    """
    from scipy import ndimage

    R0, R1 = src.resolution, resolution
    band = min(src.band if band is None else band, (src.band - 1.0) * R1 / R0)
    coords0, values0 = src.voxels()
    keys0 = _linear_keys(coords0, R0)
    order = np.argsort(keys0)
    keys0, values0 = keys0[order], values0[order]
    # target cells: those touched by the source voxels whose |sdf| (in target units) may be below band
    near = np.abs(values0) * (R1 / R0) < band + np.sqrt(3) * max(1.0, R1 / R0)
    centres = voxel_centres(cell_voxel_coords(src.cells).reshape(-1, 3)[order][near], R0)
    tcells = np.unique(np.floor((centres + 1.0) / (2.0 / R1)).astype(np.int64) // CELL, axis=0)
    tcells = tcells[((tcells >= 0) & (tcells < R1 // CELL)).all(axis=1)].astype(np.int32)
    out_cells, out_sdf = [], []
    for start in range(0, len(tcells), 4096):
        cells = tcells[start : start + 4096]
        u = (voxel_centres(cell_voxel_coords(cells), R1).astype(np.float64) + 1.0) / (2.0 / R0) - 0.5
        base = np.floor(u).astype(np.int64)
        frac = u - base
        acc = np.zeros(len(u))
        wsum = np.zeros(len(u))
        for corner in range(8):
            off = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            nb = base + off
            w = np.prod(np.where(off == 1, frac, 1.0 - frac), axis=1)
            valid = ((nb >= 0) & (nb < R0)).all(axis=1)
            k = _linear_keys(np.clip(nb, 0, R0 - 1), R0)
            pos = np.clip(np.searchsorted(keys0, k), 0, len(keys0) - 1)
            found = valid & (keys0[pos] == k)
            acc += np.where(found, w * values0[pos], 0.0)
            wsum += np.where(found, w, 0.0)
        resolved = wsum > 1e-6
        value = np.where(resolved, acc / np.maximum(wsum, 1e-12), 0.0) * (R1 / R0)
        value = np.clip(value, -src.trunc, src.trunc).reshape(-1, CELL, CELL, CELL)
        resolved = resolved.reshape(value.shape)
        if not resolved.all():
            # nearest resolved voxel of the same cell (a huge spacing along the cell axis keeps it in-cell)
            idx = ndimage.distance_transform_edt(~resolved, sampling=(1e6, 1, 1, 1), return_distances=False,
                                                 return_indices=True)
            sign = np.sign(value[tuple(idx)])
            value = np.where(resolved, value, np.where(sign < 0, -src.trunc, src.trunc))
        occupied = (np.abs(value) < band).reshape(len(cells), -1).any(axis=1)
        out_cells.append(cells[occupied])
        out_sdf.append(value[occupied].astype(np.float32))
    return SparseSDF(R1, np.concatenate(out_cells).astype(np.int32), np.concatenate(out_sdf), band, src.trunc)
