"""The mesh -> training sample recipe: load, normalise, watertight solid, sparse SDFs, sharp edges, renders.

One sample is keyed by :func:`sample_key` (the first 16 hex digits of the SHA-1 of the input's absolute path);
:func:`build_sample` raises :class:`SkipMesh` with the reason for bad input.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from ..geometry.mesh_io import MeshLoadError, load_mesh
from ..geometry.normalize import BadMeshError, clean_mesh, normalise_mesh
from ..geometry.render import render_views
from ..geometry.sharp_edges import sample_segments, sharp_edges, sharp_voxel_mask
from ..geometry.sparse_sdf import compute_sparse_sdf
from ..geometry.watertight import WatertightError, make_watertight


class SkipMesh(ValueError):
    """This input is skipped (the message is the manifest's reason)."""


def sample_key(path: str) -> str:
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_sample(path: str, cfg) -> tuple[dict, dict]:
    """Mesh file -> (decoded sample, stats). Raises SkipMesh with the reason for bad input."""
    timings = {}
    t = time.perf_counter()
    try:
        mesh = load_mesh(path)
        if len(mesh.faces) > cfg.max_faces:
            raise SkipMesh(f"{len(mesh.faces)} faces > max_faces={cfg.max_faces}")
        mesh = clean_mesh(mesh)
        mesh, norm = normalise_mesh(mesh, cfg.extent)
    except (MeshLoadError, BadMeshError) as e:
        raise SkipMesh(str(e)) from None
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        solid = make_watertight(mesh, cfg.watertight.mode, cfg.watertight.resolution, cfg.watertight.offset,
                                cfg.sdf.backend, cfg.watertight.decisive)
    except WatertightError as e:
        raise SkipMesh(f"watertight failed: {e}") from None
    timings["watertight"] = time.perf_counter() - t

    t = time.perf_counter()
    # the edges of the stored surface: the exact solid of closed bodies (no edge buried in another body), else
    # the input (the winding path stores its surface; a rebuilt shell only offsets it)
    edges = sharp_edges(solid.surface if solid.path == "closed" else mesh, cfg.sharp.angle_deg)
    timings["sharp_edges"] = time.perf_counter() - t
    query = solid.query(cfg.sdf.nsamples, cfg.sdf.backend)
    surface = solid.surface
    sdfs, voxel_counts = {}, {}
    for R in cfg.resolutions:
        t = time.perf_counter()
        s = compute_sparse_sdf(surface.vertices, surface.faces, int(R), cfg.sdf.band, cfg.sdf.trunc, query=query)
        if len(s.cells) == 0:
            raise SkipMesh(f"no occupied cell at resolution {R}")
        sharp = sharp_voxel_mask(s, sample_segments(edges, 1.0 / R), cfg.sharp.radius)
        sdfs[int(R)] = {"cells": s.cells, "sdf": s.sdf, "sharp": sharp, "band": s.band, "trunc": s.trunc}
        voxel_counts[int(R)] = {"cells": int(len(s.cells)), "band_voxels": int((np.abs(s.sdf) < s.band).sum()),
                                "sharp_voxels": int(sharp.sum())}
        timings[f"sdf{R}"] = time.perf_counter() - t

    views = None
    if cfg.views > 0:
        t = time.perf_counter()
        images, cams = render_views(mesh, cfg.views, cfg.render.size, seed=int(sample_key(path), 16) % 2**31,
                                    elevation_deg=tuple(cfg.render.elevation_deg),
                                    focal_mm=tuple(cfg.render.focal_mm), sensor_mm=cfg.render.sensor_mm)
        views = {"rgba": np.stack(images), "intrinsics": np.stack([c.intrinsics for c in cams]),
                 "extrinsics": np.stack([c.extrinsics for c in cams]),
                 **{k: np.array([getattr(c, k) for c in cams], np.float32)
                    for k in ("elevation", "azimuth", "focal_mm", "sensor_mm")}}
        timings["render"] = time.perf_counter() - t

    stats = {"faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)), "watertight": solid.stats(),
             "solid_faces": int(len(surface.faces)), "sharp_edges": int(len(edges)), "voxels": voxel_counts,
             "timings": {k: round(v, 3) for k, v in timings.items()}}
    meta = {"source": path, "sha256": file_sha256(path), "normalisation": {"center": norm.center,
            "scale": norm.scale, "extent": cfg.extent}, "stats": stats}
    return {"key": sample_key(path), "sdf": sdfs, "views": views, "meta": meta}, stats
