"""Mesh ingestion: obj/glb/gltf/ply/stl/off files (scenes flattened) -> one triangle mesh.

`load_mesh(path)` returns a `trimesh.Trimesh` in the file's own frame with per-vertex colours when the
asset has vertex colours or a texture (textures are sampled to vertex colours so that flattening a scene
keeps every part's colour). Errors are raised as `MeshLoadError` with the file name and the reason.
"""
from __future__ import annotations

import errno
import os

import trimesh

SUPPORTED_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")


class MeshLoadError(ValueError):
    """The file cannot be turned into a usable triangle mesh (the message says why)."""


def is_supported(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_SUFFIXES)


TRANSIENT_ERRNOS = {errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.EACCES, errno.EPERM}


def is_transient_error(e: BaseException) -> bool:
    """Out of memory, permissions, descriptor limits: the machine's state, not the file's content (a retry
    may pass)."""
    return isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS)


def _with_vertex_colours(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Turn a textured or material-coloured visual into per-vertex RGBA colours (uint8 [V, 4])."""
    visual = mesh.visual
    if visual is None or visual.kind is None:
        return mesh
    if visual.kind == "texture":
        try:
            mesh.visual = visual.to_color()
        except Exception:  # broken texture/uv: keep the geometry, drop the colour
            mesh.visual = trimesh.visual.ColorVisuals(mesh)
    return mesh


def flatten_scene(loaded) -> trimesh.Trimesh:
    """A `Trimesh` or a `Scene` (with its node transforms applied) -> one `Trimesh`."""
    if isinstance(loaded, trimesh.Trimesh):
        return _with_vertex_colours(loaded)
    if isinstance(loaded, trimesh.Scene):
        parts = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            geom = loaded.geometry[name]
            if not isinstance(geom, trimesh.Trimesh) or len(geom.faces) == 0:
                continue
            part = _with_vertex_colours(geom.copy())
            part.apply_transform(transform)
            parts.append(part)
        if not parts:
            raise MeshLoadError("scene holds no triangle geometry")
        has_colour = [p.visual.kind == "vertex" for p in parts]
        if any(has_colour) and not all(has_colour):
            for p in parts:  # give uncoloured parts the default grey so concatenation keeps colours
                p.visual = trimesh.visual.ColorVisuals(p, vertex_colors=p.visual.vertex_colors)
        return trimesh.util.concatenate(parts)
    raise MeshLoadError(f"unsupported content type {type(loaded).__name__} (point cloud or path?)")


def load_mesh(path: str) -> trimesh.Trimesh:
    """Load a mesh file and return one triangle mesh (raises `MeshLoadError` naming the file)."""
    if not os.path.isfile(path):
        raise MeshLoadError(f"{path}: no such file")
    if not is_supported(path):
        raise MeshLoadError(f"{path}: unsupported suffix, expected one of {SUPPORTED_SUFFIXES}")
    try:
        loaded = trimesh.load(path, process=False)
        mesh = flatten_scene(loaded)
    except MeshLoadError as e:
        raise MeshLoadError(f"{path}: {e}") from None
    except Exception as e:  # parser errors of every kind: corrupt file (transient ones pass as they are)
        if is_transient_error(e):
            raise
        raise MeshLoadError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
    return mesh
