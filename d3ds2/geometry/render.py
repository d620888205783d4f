"""Conditioning renders: random cameras as in the paper and a headless Embree ray-caster (no GPU, no Blender).

Cameras (`sample_cameras`): world up is +y; elevation is the angle above the xz-plane, azimuth the angle
around +y (0 = camera on +z); focal length in mm on a square sensor `sensor_mm` wide. Each camera looks at
the origin from the distance at which the mesh's bounding sphere (radius `radius`) just fills the frame.
Intrinsics K [3, 3] in pixels (fx = fy = focal_mm / sensor_mm * size, cx = cy = size / 2); extrinsics
[4, 4] world -> camera in the OpenCV convention (x right, y down, z forward). A point X projects to
pixel coordinates (u, v) = (K @ (E @ X))[:2] / z, with pixel (col, row) covering [col, col+1) x [row, row+1).
Renders: RGB (Lambert shading of vertex colour, grey without colour) over white, and an alpha mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh


@dataclass
class Camera:
    """One view: K [3,3] float32 pixels, extrinsic [4,4] float32 world->camera (OpenCV), angles in degrees."""

    intrinsics: np.ndarray
    extrinsics: np.ndarray
    elevation: float
    azimuth: float
    focal_mm: float
    sensor_mm: float
    size: int


def look_at(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """World->camera [4,4] for a camera at `eye` looking at `target` (OpenCV axes)."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    f = target - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    if np.linalg.norm(r) < 1e-8:  # looking straight up/down: any right vector
        r = np.cross(f, np.array([0.0, 0.0, 1.0]))
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    E = np.eye(4)
    E[:3, :3] = np.stack([r, d, f])
    E[:3, 3] = -E[:3, :3] @ eye
    return E


def sample_cameras(n: int, rng: np.random.Generator, radius: float, size: int = 1024,
                   elevation_deg=(-10.0, 45.0), focal_mm=(30.0, 100.0), sensor_mm: float = 36.0,
                   margin: float = 1.02) -> list[Camera]:
    """`n` random cameras framing a bounding sphere of `radius` centred at the origin."""
    cams = []
    for _ in range(n):
        elev = rng.uniform(*elevation_deg)
        azim = rng.uniform(0.0, 360.0)
        focal = rng.uniform(*focal_mm)
        half_fov = np.arctan(sensor_mm / 2 / focal)
        dist = radius * margin / np.sin(half_fov)
        e, a = np.deg2rad(elev), np.deg2rad(azim)
        eye = dist * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        fpx = focal / sensor_mm * size
        K = np.array([[fpx, 0, size / 2], [0, fpx, size / 2], [0, 0, 1]], np.float32)
        cams.append(Camera(K, look_at(eye).astype(np.float32), float(elev), float(azim), float(focal),
                           float(sensor_mm), size))
    return cams


def project(points: np.ndarray, cam: Camera) -> np.ndarray:
    """World points [N,3] -> pixel coordinates [N,2] (u = column, v = row)."""
    E = cam.extrinsics.astype(np.float64)
    pc = np.asarray(points, np.float64) @ E[:3, :3].T + E[:3, 3]
    uvw = pc @ cam.intrinsics.astype(np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]


class Renderer:
    """Ray-casts one mesh (Embree through open3d) from many cameras."""

    def __init__(self, mesh: trimesh.Trimesh):
        import open3d as o3d

        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(mesh.vertices, np.float32)),
                                 o3d.core.Tensor(np.ascontiguousarray(mesh.faces, np.uint32)))
        self.faces = np.asarray(mesh.faces)
        colours = None
        if mesh.visual is not None and mesh.visual.kind == "vertex":
            colours = np.asarray(mesh.visual.vertex_colors, np.float32)[:, :3] / 255.0
        self.vertex_colours = colours

    def rays(self, cam: Camera) -> np.ndarray:
        """[size*size, 6] float32 rays (origin, unit direction) through the pixel centres, row-major."""
        s = cam.size
        K, E = cam.intrinsics.astype(np.float64), cam.extrinsics.astype(np.float64)
        v, u = np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5, indexing="ij")
        d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1).reshape(-1, 3)
        d = d @ E[:3, :3]  # camera -> world: R^T d
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        eye = -E[:3, :3].T @ E[:3, 3]
        return np.concatenate([np.broadcast_to(eye, d.shape), d], 1).astype(np.float32)

    def render(self, cam: Camera) -> np.ndarray:
        """RGBA uint8 [size, size, 4]: shaded colour over white, alpha 255 where the mesh is hit."""
        rays = self.rays(cam)
        hit = self.scene.cast_rays(rays)
        t = hit["t_hit"].numpy()
        mask = np.isfinite(t)
        n = hit["primitive_normals"].numpy()[mask]
        d = rays[mask, 3:]
        lambert = np.abs((n * d).sum(1))  # headlight: view direction as the light
        shade = 0.25 + 0.75 * lambert
        if self.vertex_colours is not None:
            prim = hit["primitive_ids"].numpy()[mask].astype(np.int64)
            uv = hit["primitive_uvs"].numpy()[mask]
            w = np.stack([1.0 - uv[:, 0] - uv[:, 1], uv[:, 0], uv[:, 1]], 1)
            base = (self.vertex_colours[self.faces[prim]] * w[:, :, None]).sum(1)
        else:
            base = np.full((len(shade), 3), 0.8, np.float32)
        rgb = np.ones((len(t), 3), np.float32)
        rgb[mask] = np.clip(base * shade[:, None], 0.0, 1.0)
        rgba = np.concatenate([rgb * 255.0 + 0.5, mask[:, None] * 255.0], 1).astype(np.uint8)
        return rgba.reshape(cam.size, cam.size, 4)


def render_views(mesh: trimesh.Trimesh, n_views: int, size: int, seed: int, **camera_kw):
    """(list of RGBA [size,size,4] uint8, list of Camera) for `n_views` random cameras."""
    radius = float(np.linalg.norm(np.asarray(mesh.vertices), axis=1).max())
    cams = sample_cameras(n_views, np.random.default_rng(seed), radius, size, **camera_kw)
    renderer = Renderer(mesh)
    return [renderer.render(c) for c in cams], cams
