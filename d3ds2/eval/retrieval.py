"""Shape retrieval by Chamfer distance: is each generated mesh closest to its own reference shape?

Chamfer here is point-to-point (no open3d needed, so it runs on any machine): both surfaces are given as
area-uniform point samples in the same frame; the distance of two samples P, Q is
``0.5 * (mean_p min_q |p - q| + mean_q min_p |q - p|)`` (L1 Chamfer, in frame units). With ~10^4 points per
shape the sampling floor (~0.01 for a [-1, 1] shape) is far below the distances between different shapes,
which is all a retrieval needs.
"""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from ..geometry.metrics import sample_surface


def surface_points(mesh: trimesh.Trimesh | None, n: int, seed: int = 0) -> np.ndarray | None:
    """n area-uniform points [n, 3] float32 on ``mesh``; None for a missing or empty mesh."""
    if mesh is None or len(mesh.faces) == 0 or not mesh.area > 0:
        return None
    return sample_surface(mesh, n, seed)[0].astype(np.float32)


def chamfer_matrix(preds: list[np.ndarray | None], refs: list[np.ndarray]) -> np.ndarray:
    """[P, R] float64 symmetric L1 Chamfer distances of every prediction point set [n, 3] to every reference
    point set [m, 3]; a missing prediction (None or no points, e.g. a decode without surface) gets +inf in its
    whole row."""
    out = np.full((len(preds), len(refs)), np.inf)
    ref_trees = [cKDTree(r) for r in refs]
    for i, p in enumerate(preds):
        if p is None or len(p) == 0:
            continue
        tree = cKDTree(p)
        for j, (r, rt) in enumerate(zip(refs, ref_trees)):
            out[i, j] = 0.5 * (rt.query(p, workers=-1)[0].mean() + tree.query(r, workers=-1)[0].mean())
    return out


def retrieval(matrix: np.ndarray) -> dict:
    """Top-1 retrieval of a square [N, N] distance matrix whose row i should be closest to column i.

    Returns {"top1": fraction of rows i whose strictly smallest entry is column i (a row of +inf, or a tie
    with another column, counts as a miss), "nearest": argmin column per row (-1 for a row of +inf),
    "rank": rank of the true column in each row (0 = retrieved; N for a row of +inf)}."""
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"retrieval needs a non-empty square distance matrix, got shape {m.shape}")
    n = m.shape[0]
    finite = np.isfinite(m).any(1)
    nearest = np.where(finite, m.argmin(1), -1)
    own = np.diag(m)
    rank = np.where(finite, (m < own[:, None]).sum(1) + ((m == own[:, None]).sum(1) - 1), n)
    return {"top1": float((rank == 0).mean()), "nearest": nearest.tolist(), "rank": rank.tolist()}
