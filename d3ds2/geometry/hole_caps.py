"""The caps of an open solid's holes: the part of the w = 0.5 surface (w its generalized winding number) that
spans the holes, as triangles, so that a distance query over input + caps measures the distance to the solid's
boundary everywhere (`watertight.Solid.query`).

At resolution R (voxel h = 2 / R) the caps are meshed on the voxel-centre lattice, in cubes of 8 voxels:
1. seeds: the cubes within one cube of the boundary edges (edges of one face) of the input;
2. flood: w at the cube corners; a cube whose corners straddle 0.5 holds the level set; from each such cube that
   is a seed or lies clear of the input surface (where w also jumps across 0.5) the flood goes on to its 26
   neighbours, so it follows the caps into the middle of the widest hole but not along the input surface;
3. w at every voxel centre of the straddling cubes, marching cubes of 0.5 - w (`sparse_marching_cubes`);
4. triangles with all vertices within 1 voxel of the input are dropped: there the level set is the jump across
   the input surface, not a cap. The caps so end within about a voxel of their rims.
"""
from __future__ import annotations

import numpy as np
import trimesh

from d3ds2.geometry.marching_cubes import sparse_marching_cubes
from d3ds2.geometry.sparse_sdf import CELL, voxel_centres
from d3ds2.geometry.winding import WindingNumber

_NEIGHBOURS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [27, 3]
_CORNERS = _NEIGHBOURS[(_NEIGHBOURS >= 0).all(axis=1)]  # [8, 3]
_LATTICE = np.stack(np.meshgrid(*[np.arange(CELL + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [729, 3]


def boundary_points(mesh: trimesh.Trimesh, step: float) -> np.ndarray:
    """Points [N, 3] every `step` (world units) along the edges used by one face (vertices merged by position)."""
    verts, inverse = np.unique(np.asarray(mesh.vertices, np.float64), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[np.asarray(mesh.faces)]
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    rim = edges[trimesh.grouping.group_rows(edges, require_count=1)].reshape(-1, 2)
    a, b = verts[rim[:, 0]], verts[rim[:, 1]]
    n = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / step)).astype(np.int64)
    t = np.concatenate([np.arange(k) / k for k in n]) if len(n) else np.zeros(0)
    return np.repeat(a, n, 0) + t[:, None] * np.repeat(b - a, n, 0)


def hole_caps(mesh: trimesh.Trimesh, winding: WindingNumber, distance, resolution: int) -> trimesh.Trimesh:
    """The caps of `mesh`'s holes (module doc) at `resolution`; `winding` its winding number, `distance` its
    unsigned distance query (`sparse_sdf.surface_distance`). Empty when the mesh has no boundary edge."""
    R, h = resolution, 2.0 / resolution
    n = R // CELL - 1  # cubes per axis: cube k spans the voxel centres CELL*k .. CELL*(k+1)
    rim = boundary_points(mesh, CELL * h / 2)
    empty = trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    if not len(rim):
        return empty
    seeds = np.unique(np.floor((rim + 1.0) / h - 0.5).astype(np.int64) // CELL, axis=0)
    seeds = np.unique((seeds[:, None] + _NEIGHBOURS[None]).reshape(-1, 3), axis=0)
    seeds = seeds[((seeds >= 0) & (seeds < n)).all(axis=1)]
    key = lambda c: (c[:, 0] * (n + 1) + c[:, 1]) * (n + 1) + c[:, 2]  # noqa: E731 (cube/corner -> int)
    seed_keys = set(key(seeds).tolist())
    corner_w: dict[int, float] = {}
    visited, caps, front = set(seed_keys), [], seeds
    clear_of = CELL * h * np.sqrt(3) / 2  # a cube whose centre is farther from the input holds none of it
    while len(front):
        corners = (front[:, None] + _CORNERS[None]).reshape(-1, 3)
        ck = key(corners)
        new = np.unique(ck[[k not in corner_w for k in ck.tolist()]])
        if len(new):
            pts = np.stack([new // (n + 1) ** 2, new // (n + 1) % (n + 1), new % (n + 1)], 1) * CELL
            corner_w.update(zip(new.tolist(), winding(voxel_centres(pts, R)).tolist()))
        w = np.array([corner_w[k] for k in ck.tolist()]).reshape(-1, 8)
        straddles = (w.min(axis=1) < 0.5) & (w.max(axis=1) > 0.5)
        front = front[straddles]
        caps.append(front)
        centres = voxel_centres(front * CELL, R) + CELL * h / 2
        grows = np.isin(key(front), list(seed_keys)) | (distance.unsigned(centres) > clear_of)
        nxt = np.unique((front[grows][:, None] + _NEIGHBOURS[None]).reshape(-1, 3), axis=0)
        nxt = nxt[((nxt >= 0) & (nxt < n)).all(axis=1)]
        fresh = np.array([k not in visited for k in key(nxt).tolist()], bool)
        front = nxt[fresh]
        visited.update(key(front).tolist())
    cubes = np.concatenate(caps)
    if not len(cubes):
        return empty
    coords = np.unique((cubes[:, None] * CELL + _LATTICE[None]).reshape(-1, 3), axis=0)
    w = winding(voxel_centres(coords, R))
    caps_mesh = sparse_marching_cubes(coords, 0.5 - w, R)
    if not len(caps_mesh.faces):
        return empty
    faces = np.asarray(caps_mesh.faces)
    near = distance.unsigned(np.asarray(caps_mesh.vertices)) < h
    # the voxel cube of each triangle lies in a straddling cube (elsewhere marching cubes met unsampled voxels)
    cube_of = np.floor((np.asarray(caps_mesh.triangles_center) + 1.0) / h - 0.5).astype(np.int64) // CELL
    keep = ~near[faces].all(axis=1) & np.isin(key(cube_of), key(cubes))
    out = trimesh.Trimesh(caps_mesh.vertices, faces[keep], process=False)
    out.remove_unreferenced_vertices()
    return out
