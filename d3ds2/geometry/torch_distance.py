"""Distance and inside queries against a triangle mesh in PyTorch (CUDA or CPU), without open3d.

The same queries as `d3ds2.geometry.sparse_sdf.SurfaceDistance` (Embree), so `compute_sparse_sdf` runs on a
GPU machine where open3d is not installed. Both are exact up to float32 rounding:

- `unsigned`: brute force over triangles with culling. Query points are sorted along a Morton curve
  and cut into chunks; a chunk meets only the triangles whose bounding box lies within `reach` of the
  chunk's box. A point whose nearest candidate is within `reach` has its exact answer (any triangle within
  that distance is a candidate); the others try again with 4x the reach.
- `inside`: ray parity along `nsamples` fixed random directions (majority vote). For each direction the
  mesh and points are rotated so that the ray is +z; a chunk meets the triangles whose xy box overlaps the
  chunk's and that reach above its lowest point. Random directions make grazing hits measure-zero.
"""
from __future__ import annotations

import numpy as np
import torch

_SORT_BITS = 10  # query points are ordered along the Morton curve of a 2^10 grid over [-1, 1]^3


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix [3, 3] (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _morton(q: torch.Tensor) -> torch.Tensor:
    """Morton (z-order) codes [N] int64 of integer coords q [N, 3] in [0, 2^_SORT_BITS)."""
    code = torch.zeros(len(q), dtype=torch.long, device=q.device)
    for bit in range(_SORT_BITS):
        for axis in range(3):
            code |= ((q[:, axis] >> bit) & 1) << (3 * bit + 2 - axis)
    return code


def _point_triangle_dist2(p: torch.Tensor, tri: dict) -> torch.Tensor:
    """Squared distance of points p [P, 3] to triangles (dict of [T, ...] tensors) -> [P, T]."""
    d2 = None
    inside = None
    for i in range(3):
        rel = p[:, None, :] - tri["v"][None, :, i, :]  # [P, T, 3] point minus vertex i
        e = tri["e"][:, i, :]  # [T, 3] edge from vertex i to vertex i+1
        t = ((rel * e[None]).sum(-1) * tri["inv_len2"][None, :, i]).clamp(0.0, 1.0)
        seg = (rel - t[..., None] * e[None]).square().sum(-1)  # to the segment
        d2 = seg if d2 is None else torch.minimum(d2, seg)
        side = (rel * tri["edge_normal"][None, :, i, :]).sum(-1) <= 0.0
        inside = side if inside is None else inside & side
    plane = ((p[:, None, :] - tri["v"][None, :, 0, :]) * tri["normal"][None]).sum(-1)
    inside = inside & tri["proper"][None]
    return torch.where(inside, plane.square(), d2)


def _triangle_terms(v: torch.Tensor) -> dict:
    """Per-triangle constants of the distance test for vertices v [T, 3, 3]."""
    e = torch.roll(v, -1, dims=1) - v  # e[:, i] = v[i+1] - v[i]
    n = torch.linalg.cross(e[:, 0], -e[:, 2])
    n_len = n.norm(dim=-1, keepdim=True)
    proper = n_len[:, 0] > 1e-12
    unit_n = n / n_len.clamp_min(1e-30)
    return {"v": v, "e": e, "inv_len2": 1.0 / e.square().sum(-1).clamp_min(1e-30),
            "edge_normal": torch.linalg.cross(e, unit_n[:, None, :].expand_as(e)),
            "normal": unit_n, "proper": proper}


def _take(tri: dict, idx: torch.Tensor) -> dict:
    return {k: t[idx] for k, t in tri.items()}


class TorchSurfaceDistance:
    """Unsigned distance and ray-parity inside queries for a mesh (vertices [V, 3], faces [F, 3]).

    `device`: where the work runs (default CUDA when available). `reach` (world units) is the culling
    distance of the first round; `chunk` the query points per chunk (default 8192 on CUDA, where launches
    dominate, 2048 on the CPU); `pair_budget` bounds point-triangle pairs per evaluation (memory ~ 40 bytes
    per pair)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, nsamples: int = 3, device=None,
                 reach: float = 0.08, chunk: int | None = None, pair_budget: int = 1 << 24, seed: int = 0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.chunk = chunk or (8192 if self.device.type == "cuda" else 2048)
        self.nsamples, self.reach, self.pair_budget = nsamples, reach, pair_budget
        v = torch.as_tensor(np.asarray(vertices, np.float32)[np.asarray(faces, np.int64)], device=self.device)
        self.tri = _triangle_terms(v)
        self.lo, self.hi = v.amin(1), v.amax(1)  # [T, 3] triangle boxes
        rng = np.random.default_rng(seed)
        self.rays = []  # per direction: rotation [3, 3], rotated triangles' xy box, z max, 2D terms
        for _ in range(nsamples):
            rot = torch.as_tensor(_rotation(rng), dtype=torch.float32, device=self.device)
            w = v @ rot.T  # [T, 3, 3] rotated so that the ray runs along +z
            x, y, z = w.unbind(-1)
            area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
            self.rays.append({"rot": rot, "xy_lo": w[..., :2].amin(1), "xy_hi": w[..., :2].amax(1),
                              "z_hi": z.amax(1), "x": x, "y": y, "z": z, "area2": area2})

    def _sorted(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """points [N, 3] -> (points on device, indices [N] ordering them along a Morton curve), so that
        consecutive chunks are compact in space."""
        p = torch.as_tensor(np.ascontiguousarray(points, np.float32), device=self.device)
        side = 1 << _SORT_BITS
        q = ((p + 1.0) * (side / 2)).long().clamp(0, side - 1)
        return p, torch.argsort(_morton(q))

    def _nearest(self, p: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min squared distance [P] of points p [P, 3] over candidate triangles (indices [K]), and the
        index of that triangle [P] (-1 when there is no candidate)."""
        best = torch.full((len(p),), float("inf"), device=self.device)
        arg = torch.full((len(p),), -1, dtype=torch.long, device=self.device)
        step = max(1, self.pair_budget // max(1, len(p)))
        for start in range(0, len(cand), step):
            part = cand[start : start + step]
            d2, j = _point_triangle_dist2(p, _take(self.tri, part)).min(1)
            better = d2 < best
            best, arg = torch.where(better, d2, best), torch.where(better, part[j], arg)
        return best, arg

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """points [N, 3] -> (distance [N] float32 world units, index [N] int64 of the closest face).

        Rounds of growing reach (x4 each): a chunk meets the triangles within reach of its box; points whose
        nearest candidate is within reach are final, the others go to the next round (the last round, with a
        reach beyond the [-1, 1]^3 diagonal, takes every triangle)."""
        p, pending = self._sorted(points)
        dist = torch.empty(len(p), device=self.device)
        face = torch.empty(len(p), dtype=torch.long, device=self.device)
        reach = self.reach
        while len(pending):
            last = reach > 4.0
            unresolved = []
            for idx in pending.split(self.chunk):
                q = p[idx]
                lo, hi = q.amin(0) - reach, q.amax(0) + reach
                near = ((self.lo <= hi) & (self.hi >= lo)).all(1).nonzero()[:, 0]
                d2, j = self._nearest(q, near)
                done = torch.ones_like(d2, dtype=torch.bool) if last else d2 <= reach * reach
                dist[idx[done]], face[idx[done]] = d2[done].sqrt(), j[done]
                unresolved.append(idx[~done])
            pending = torch.cat(unresolved)
            reach *= 4.0
        return dist.cpu().numpy(), face.cpu().numpy()

    def unsigned(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> distance [N] float32 (world units)."""
        return self.closest(points)[0]

    def inside(self, points: np.ndarray) -> np.ndarray:
        """points [N, 3] -> bool [N], True inside (ray parity, majority over `nsamples` directions)."""
        p, order = self._sorted(points)
        votes = torch.zeros(len(p), dtype=torch.int32, device=self.device)
        for ray in self.rays:
            for idx in order.split(self.chunk):
                r = p[idx] @ ray["rot"].T
                lo, hi = r[:, :2].amin(0), r[:, :2].amax(0)
                cand = (((ray["xy_lo"] <= hi) & (ray["xy_hi"] >= lo)).all(1)
                        & (ray["z_hi"] > r[:, 2].min()) & (ray["area2"].abs() > 1e-20)).nonzero()[:, 0]
                crossings = torch.zeros(len(r), dtype=torch.int32, device=self.device)
                step = max(1, self.pair_budget // max(1, len(r)))
                for start in range(0, len(cand), step):
                    crossings += self._crossings(r, ray, cand[start : start + step])
                votes[idx] += crossings % 2
        return (votes * 2 > self.nsamples).cpu().numpy()

    @staticmethod
    def _crossings(r: torch.Tensor, ray: dict, cand: torch.Tensor) -> torch.Tensor:
        """Number of candidate triangles hit by the +z rays from rotated points r [P, 3] -> int32 [P]."""
        x, y, z, area2 = ray["x"][cand], ray["y"][cand], ray["z"][cand], ray["area2"][cand]
        px, py = r[:, 0:1], r[:, 1:2]
        w = []  # barycentric weights (times area2) of the point's projection
        for i in range(3):
            j, k = (i + 1) % 3, (i + 2) % 3
            w.append((x[None, :, j] - px) * (y[None, :, k] - py) - (x[None, :, k] - px) * (y[None, :, j] - py))
        s = torch.sign(area2)[None]
        hit = (w[0] * s > 0) & (w[1] * s > 0) & (w[2] * s > 0)
        z_hit = (w[0] * z[None, :, 0] + w[1] * z[None, :, 1] + w[2] * z[None, :, 2]) / area2[None]
        return (hit & (z_hit > r[:, 2:3])).sum(1, dtype=torch.int32)
