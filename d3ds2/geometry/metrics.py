"""Mesh-to-mesh metrics: Chamfer distance, F-score@threshold, normal consistency, edge Chamfer distance.

Points are sampled area-uniformly on each surface and measured against the *other surface itself*
(exact closest point on its triangles: Embree via open3d where installed, else the PyTorch backend of
`torch_distance`, CUDA when available), not against a second point sample: a
point-to-point measure is limited by the sampling density (two samples of the same mesh are ~0.5/sqrt(ρ)
apart), which would cap F-score at small thresholds even for identical meshes.
"""
from __future__ import annotations

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from d3ds2.geometry.sharp_edges import sample_segments, sharp_edges

from d3ds2.fallbacks import warn_fallback


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n area-uniform points [n,3] and their face normals [n,3]."""
    pts, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts), np.asarray(mesh.face_normals)[face]


def closest_on_surface(mesh: trimesh.Trimesh, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance [n] from each point to the mesh surface, and the unit normal [n,3] of the closest face."""
    try:
        import open3d as o3d
    except ImportError as e:
        from d3ds2.geometry.torch_distance import TorchSurfaceDistance

        warn_fallback("metrics-open3d", f"mesh metrics: open3d cannot be imported ({e}); closest points run on the "
                                        f"PyTorch backend (slower on a CPU). Fix: pip install open3d")

        dist, face = TorchSurfaceDistance(mesh.vertices, mesh.faces, nsamples=0).closest(points)
        return dist.astype(np.float64), np.asarray(mesh.face_normals)[face]
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, np.float32)),
        o3d.core.Tensor(np.ascontiguousarray(mesh.faces, np.uint32)),
    )
    ans = scene.compute_closest_points(o3d.core.Tensor(np.ascontiguousarray(points, np.float32)))
    closest = ans["points"].numpy().astype(np.float64)
    face = ans["primitive_ids"].numpy().astype(np.int64)
    return np.linalg.norm(closest - points, axis=1), np.asarray(mesh.face_normals)[face]


def edge_chamfer(pred: trimesh.Trimesh, ref: trimesh.Trimesh, angle_deg: float = 15.0, spacing: float = 0.005
                 ) -> float | None:
    """Edge Chamfer distance: symmetric L1 Chamfer between point samples of the two meshes' sharp edges.

    Sharp edges: dihedral angle above ``angle_deg`` (:func:`~d3ds2.geometry.sharp_edges.sharp_edges`); each
    is sampled every ``spacing`` (frame units, end points included); the distance is
    ``0.5 * (mean_p min_q |p - q| + mean_q min_p |q - p|)`` over those samples (nearest sample, not the
    nearest point of a segment: the discretisation error is below ``spacing**2 / (8 d)`` at distance d).
    None when the reference has no sharp edge (undefined); +inf when only the prediction has none.
    """
    r = sample_segments(sharp_edges(ref, angle_deg), spacing)
    if len(r) == 0:
        return None
    p = sample_segments(sharp_edges(pred, angle_deg), spacing)
    if len(p) == 0:
        return float("inf")
    d_pr = cKDTree(r).query(p, workers=-1)[0]
    d_rp = cKDTree(p).query(r, workers=-1)[0]
    return float(0.5 * (d_pr.mean() + d_rp.mean()))


def mesh_metrics(pred: trimesh.Trimesh, ref: trimesh.Trimesh, n_points: int = 100_000,
                 thresholds=(0.01, 0.02), seed: int = 0, edge_angle: float | None = None,
                 edge_spacing: float = 0.005) -> dict:
    """{chamfer_l1, chamfer_l2, fscore@t..., normal_consistency[, edge_chamfer]} between two meshes (same frame).

    chamfer_l1: mean of the two mean point-to-surface distances (pred samples to ref, ref samples to pred);
    chamfer_l2: the same with squared distances; fscore@t: harmonic mean of precision (pred samples within
    t of ref) and recall (ref samples within t of pred); normal consistency: mean |cos| between a sample's
    normal and the normal of the closest face on the other mesh, both directions averaged; edge_chamfer:
    :func:`edge_chamfer` with ``edge_angle`` / ``edge_spacing`` (left out when ``edge_angle`` is None or the
    reference has no sharp edge).
    """
    if len(pred.faces) == 0 or len(ref.faces) == 0:
        raise ValueError("mesh_metrics: empty mesh")
    p, pn = sample_surface(pred, n_points, seed)
    r, rn = sample_surface(ref, n_points, seed + 1)
    d_pr, n_pr = closest_on_surface(ref, p)
    d_rp, n_rp = closest_on_surface(pred, r)
    out = {"chamfer_l1": 0.5 * (d_pr.mean() + d_rp.mean()), "chamfer_l2": 0.5 * ((d_pr**2).mean() + (d_rp**2).mean()),
           "normal_consistency": 0.5 * (np.abs((pn * n_pr).sum(1)).mean() + np.abs((rn * n_rp).sum(1)).mean())}
    for t in thresholds:
        prec, rec = (d_pr < t).mean(), (d_rp < t).mean()
        out[f"fscore@{t}"] = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
    if edge_angle is not None:
        ecd = edge_chamfer(pred, ref, edge_angle, edge_spacing)
        if ecd is not None:
            out["edge_chamfer"] = ecd
    return {k: float(v) for k, v in out.items()}
