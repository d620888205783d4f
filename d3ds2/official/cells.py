"""Latent cells of the 1024 stage from the 512 mesh, as the official pipeline derives them (``mesh2index``).

The mesh is re-normalised (bbox centred, longest side 2 x 0.95); every point of the official UDF grid
(point i at 2 i / (R - 1) - 1 in the [-1, 1] frame) closer than ``band`` voxels (4, i.e. 4 / R in the
official half-size frame) to the surface is active, and its cell (i // 8) is kept. Only the cells near the
surface are tested (coarse-to-fine culling), so no dense R³ grid is built.
"""
from __future__ import annotations

import numpy as np
import torch
import trimesh

from ..geometry.normalize import normalise_mesh
from ..geometry.sparse_sdf import CELL, candidate_cells, surface_distance

OFFICIAL_EXTENT = 0.95  # normalize_mesh scale of the official pipeline
OFFICIAL_BAND = 4.0  # UDF threshold in voxels of mesh2index


def mesh_cells(mesh: trimesh.Trimesh, resolution: int, band: float = OFFICIAL_BAND, normalise: bool = True,
               chunk: int = 4096) -> tuple[np.ndarray, trimesh.Trimesh]:
    """-> (cells [M, 3] int32 of the fine ``resolution`` // 8 grid, sorted; the normalised mesh they index)."""
    if normalise:
        mesh, _ = normalise_mesh(mesh, OFFICIAL_EXTENT)
    query = surface_distance(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int64))
    # the official grid differs from voxel centres by < 1 voxel: cull with a margin, then test exactly
    cand = candidate_cells(query, resolution, band + 1.5)
    local = np.stack(np.meshgrid(*[np.arange(CELL)] * 3, indexing="ij"), -1).reshape(-1, 3)
    step, thresh = 2.0 / (resolution - 1), band * 2.0 / resolution
    keep = np.zeros(len(cand), bool)
    for s in range(0, len(cand), chunk):
        pts = (cand[s:s + chunk, None, :] * CELL + local[None]).reshape(-1, 3) * step - 1.0
        d = query.unsigned(pts.astype(np.float32)).reshape(-1, CELL**3)
        keep[s:s + chunk] = (d < thresh).any(1)
    cells = cand[keep].astype(np.int32)
    return cells[np.lexsort((cells[:, 2], cells[:, 1], cells[:, 0]))], mesh


def batch_mesh_cells(meshes: list[trimesh.Trimesh], resolution: int, band: float = OFFICIAL_BAND) -> torch.Tensor:
    """One mesh per sample -> int32 (batch, x, y, z) latent cells of the next stage, sorted."""
    rows = []
    for b, m in enumerate(meshes):
        cells = mesh_cells(m, resolution, band)[0] if len(m.faces) else np.zeros((1, 3), np.int32) + resolution // 16
        rows.append(np.concatenate([np.full((len(cells), 1), b, np.int32), cells], 1))
    return torch.from_numpy(np.concatenate(rows)).int()
