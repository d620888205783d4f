"""Normalisation into the project frame and basic cleaning.

Frame: the axis-aligned bounding box is centred at the origin and its longest side scaled to
2 * `extent` (default 0.95), so the mesh lies in [-extent, extent]^3 inside the [-1, 1]^3 grid box.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh


class BadMeshError(ValueError):
    """The mesh is unusable (empty, non-finite, all faces degenerate...); the message says why."""


@dataclass(frozen=True)
class Normalisation:
    """x_normalised = (x_original - center) * scale."""

    center: tuple[float, float, float]
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - np.asarray(self.center)) * self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, np.float64) / self.scale + np.asarray(self.center)


def clean_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Drop faces with non-finite vertices or zero area and unreferenced vertices; raise if nothing is left."""
    verts = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.int64)
    if len(verts) == 0 or len(faces) == 0:
        raise BadMeshError("empty mesh (no vertices or no faces)")
    finite_v = np.isfinite(verts).all(axis=1)
    keep = finite_v[faces].all(axis=1)
    tri = verts[faces[keep]]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    extent = np.ptp(verts[finite_v], axis=0).max() if finite_v.any() else 0.0
    good = area2 > (1e-12 * extent * extent)
    idx = np.flatnonzero(keep)[good]
    if len(idx) == 0:
        raise BadMeshError("no valid face (all faces degenerate or with NaN/inf vertices)")
    out = mesh.copy()
    out.update_faces(np.isin(np.arange(len(faces)), idx))
    out.remove_unreferenced_vertices()
    return out


def normalise_mesh(mesh: trimesh.Trimesh, extent: float = 0.95) -> tuple[trimesh.Trimesh, Normalisation]:
    """Centre the bbox at the origin and scale the longest side to 2 * extent. Returns (mesh, transform)."""
    lo, hi = mesh.bounds
    size = float((hi - lo).max())
    if not np.isfinite(size) or size <= 0:
        raise BadMeshError(f"degenerate bounding box (longest side {size})")
    norm = Normalisation(center=tuple(float(c) for c in (lo + hi) / 2), scale=2.0 * extent / size)
    out = mesh.copy()
    out.vertices = norm.apply(mesh.vertices)
    return out, norm
