"""Point clouds for the shape-image alignment encoders: coloured surface samples, farthest point sampling,
k-nearest-neighbour patches.

Every encoder of :mod:`d3ds2.eval.alignment` reads ``points [B, N, 6]`` = xyz + rgb in [0, 1] and cuts them
into patches around farthest-point-sampled centers; these are the shared pieces. Pure PyTorch, any device.
"""
from __future__ import annotations

import numpy as np
import torch
import trimesh

DEFAULT_RGB = 0.4  # colour of meshes without colours (generated meshes): mid grey


def coloured_surface_points(mesh: trimesh.Trimesh, n: int, seed: int = 0, default_rgb: float = DEFAULT_RGB,
                            mesh_colours: bool = True) -> np.ndarray:
    """n area-uniform surface samples of ``mesh`` as float32 [n, 6]: xyz (the mesh's frame) + rgb in [0, 1].

    Colour: the mean vertex colour of the sampled face for vertex-coloured meshes (textured meshes are
    converted to vertex colours by trimesh), the face colour for face-coloured ones, else ``default_rgb``;
    ``mesh_colours=False``: ``default_rgb`` everywhere.
    """
    if len(mesh.faces) == 0 or not mesh.area > 0:
        raise ValueError("coloured_surface_points: the mesh has no surface (no faces or zero area)")
    xyz, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    rgb = np.full((n, 3), default_rgb, np.float32)
    visual = mesh.visual if mesh_colours else None
    if visual is not None and visual.kind == "texture":
        try:
            visual = visual.to_color()
        except Exception:  # a texture trimesh cannot sample: keep the default colour
            visual = None
    if visual is not None and visual.kind == "vertex":
        rgb = np.asarray(visual.vertex_colors, np.float32)[mesh.faces[face], :3].mean(1) / 255.0
    elif visual is not None and visual.kind == "face":
        rgb = np.asarray(visual.face_colors, np.float32)[face, :3] / 255.0
    return np.concatenate([np.asarray(xyz, np.float32), rgb], 1)


def normalise_unit_sphere(xyz: torch.Tensor) -> torch.Tensor:
    """[B, N, 3] -> centred on each cloud's centroid, scaled so that its farthest point has norm 1."""
    xyz = xyz - xyz.mean(1, keepdim=True)
    return xyz / xyz.norm(dim=-1).amax(1).clamp_min(1e-12)[:, None, None]


POINTNET2_SKIP_SQ_NORM = 1e-3  # pointnet2_ops' FPS kernel never picks points with x^2 + y^2 + z^2 <= 1e-3


def farthest_point_sample(xyz: torch.Tensor, m: int, skip_sq_norm: float | None = None) -> torch.Tensor:
    """Indices long [B, m] of m farthest-point samples of xyz [B, N, 3], starting from point 0 (as the
    pointnet2 CUDA kernel); ties go to the lowest index. With ``skip_sq_norm`` (pointnet2_ops' kernel:
    :data:`POINTNET2_SKIP_SQ_NORM`), points whose squared norm is at most that are never picked after the first."""
    b, n, _ = xyz.shape
    if m > n:
        raise ValueError(f"farthest_point_sample: {m} samples requested from {n} points")
    eligible = (xyz.square().sum(-1) > skip_sq_norm) if skip_sq_norm is not None else None
    idx = torch.zeros(b, m, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(1, m):
        dist = torch.minimum(dist, (xyz - xyz[rows, last][:, None]).square().sum(-1))
        last = (dist if eligible is None else dist.masked_fill(~eligible, -1.0)).argmax(1)
        idx[:, i] = last
    return idx


def knn(query: torch.Tensor, xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices long [B, M, k] of the k points of xyz [B, N, 3] nearest to each query [B, M, 3], nearest first."""
    return torch.cdist(query, xyz).topk(k, dim=-1, largest=False).indices


def gather(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points [B, N, C] at idx long [B, ...] -> [B, ..., C]."""
    b = points.shape[0]
    return points[torch.arange(b, device=points.device).view(b, *[1] * (idx.dim() - 1)), idx]


def knn_patches(points: torch.Tensor, n_patches: int, patch_size: int, fps_skip_sq_norm: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of points [B, N, C] (xyz first): (patches [B, G, K, C] with xyz relative to their center, the other
    channels untouched, centers [B, G, 3]); G = n_patches farthest-point centers (``fps_skip_sq_norm``: see
    :func:`farthest_point_sample`), each with its K = patch_size nearest points (itself included)."""
    xyz = points[..., :3].contiguous()
    centers = gather(xyz, farthest_point_sample(xyz, n_patches, fps_skip_sq_norm))
    patches = gather(points, knn(centers, xyz, patch_size))
    patches = torch.cat([patches[..., :3] - centers[:, :, None], patches[..., 3:]], -1)
    return patches, centers
