"""Sharp edges (dihedral angle above a threshold) and the sparse voxels near them (for L_sharp)."""
from __future__ import annotations

import numpy as np
import trimesh

from d3ds2.geometry.sparse_sdf import CELL, SparseSDF


def sharp_edges(mesh: trimesh.Trimesh, angle_deg: float = 15.0) -> np.ndarray:
    """Edges between two faces whose normals differ by more than `angle_deg`: segments [E, 2, 3] float64.

    Vertices are merged by position first (so split-normal seams count); boundary edges are not sharp.
    """
    m = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    m.merge_vertices(merge_tex=True, merge_norm=True)
    if len(m.faces) < 2:
        return np.zeros((0, 2, 3))
    angles = m.face_adjacency_angles
    edges = m.face_adjacency_edges[angles > np.deg2rad(angle_deg)]
    return np.asarray(m.vertices)[edges]


def sample_segments(segments: np.ndarray, spacing: float) -> np.ndarray:
    """Points [P, 3] along segments [E, 2, 3], at most `spacing` apart, end points included."""
    if len(segments) == 0:
        return np.zeros((0, 3))
    length = np.linalg.norm(segments[:, 1] - segments[:, 0], axis=1)
    n = np.maximum(1, np.ceil(length / spacing).astype(np.int64))
    seg = np.repeat(np.arange(len(segments)), n + 1)
    # t = linspace(0, 1, k + 1) of every segment, vectorised with linspace's arithmetic (j * (1 / k), last = 1)
    k = np.repeat(n, n + 1)
    j = np.arange(len(seg)) - np.repeat(np.cumsum(n + 1) - (n + 1), n + 1)
    t = j * (1.0 / k)
    t[j == k] = 1.0
    a, b = segments[seg, 0], segments[seg, 1]
    return a + (b - a) * t[:, None]


def sharp_voxel_mask(sdf: SparseSDF, points: np.ndarray, radius: float = 1.5) -> np.ndarray:
    """bool [M, 8, 8, 8] over the voxels of `sdf`'s cells: voxel centre within `radius` voxels of a point."""
    R = sdf.resolution
    mask = np.zeros(sdf.sdf.shape, bool)
    if len(points) == 0 or len(sdf.cells) == 0:
        return mask
    u = (np.asarray(points, np.float64) + 1.0) / (2.0 / R) - 0.5  # continuous voxel index
    r = int(np.ceil(radius))
    offs = np.stack(np.meshgrid(*[np.arange(-r, r + 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    keys = (sdf.cells.astype(np.int64) * (R // CELL) ** np.array([2, 1, 0])).sum(1)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    base = np.floor(u).astype(np.int64)
    for off in offs:
        vox = base + off
        near = np.linalg.norm(vox - u, axis=1) <= radius
        vox = vox[near & ((vox >= 0) & (vox < R)).all(axis=1)]
        if len(vox) == 0:
            continue
        cell = vox // CELL
        k = (cell * (R // CELL) ** np.array([2, 1, 0])).sum(1)
        pos = np.clip(np.searchsorted(sorted_keys, k), 0, len(keys) - 1)
        hit = sorted_keys[pos] == k
        local = vox[hit] % CELL
        mask[order[pos[hit]], local[:, 0], local[:, 1], local[:, 2]] = True
    return mask
