"""Mesh-to-mesh metrics by surface sampling: Chamfer distance, F-score@threshold, normal consistency."""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n area-uniform points [n,3] and their face normals [n,3]."""
    pts, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts), np.asarray(mesh.face_normals)[face]


def mesh_metrics(pred: trimesh.Trimesh, ref: trimesh.Trimesh, n_points: int = 100_000,
                 thresholds=(0.01, 0.02), seed: int = 0) -> dict:
    """{chamfer_l1, chamfer_l2, fscore@t..., normal_consistency} between two meshes (same frame).

    chamfer_l1: mean of the two mean nearest-neighbour distances; chamfer_l2: same with squared distances;
    fscore@t: harmonic mean of precision (pred points within t of ref) and recall; normal consistency: mean
    |cos| between each point's normal and its nearest neighbour's normal, both directions averaged.
    """
    if len(pred.faces) == 0 or len(ref.faces) == 0:
        raise ValueError("mesh_metrics: empty mesh")
    p, pn = sample_surface(pred, n_points, seed)
    r, rn = sample_surface(ref, n_points, seed + 1)
    d_pr, i_pr = cKDTree(r).query(p)
    d_rp, i_rp = cKDTree(p).query(r)
    out = {"chamfer_l1": 0.5 * (d_pr.mean() + d_rp.mean()), "chamfer_l2": 0.5 * ((d_pr**2).mean() + (d_rp**2).mean()),
           "normal_consistency": 0.5 * (np.abs((pn * rn[i_pr]).sum(1)).mean() + np.abs((rn * pn[i_rp]).sum(1)).mean())}
    for t in thresholds:
        prec, rec = (d_pr < t).mean(), (d_rp < t).mean()
        out[f"fscore@{t}"] = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    return {k: float(v) for k, v in out.items()}
