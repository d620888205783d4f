"""Watertight, consistently oriented surfaces from meshes in the wild (open, non-manifold, soups, inner shells).

Thin-shell rebuild (`rebuild_watertight`), at grid resolution W in the [-1, 1]^3 frame, voxel h = 2 / W:
1. unsigned distance to the input triangles at the voxel centres within a few voxels of the surface
   (`sparse_sdf.candidate_cells` + Embree closest points: never a dense distance query);
2. barrier = voxels with udf < `offset` voxels (>= 0.5 blocks every 6-connected path across the surface);
3. flood fill of the non-barrier voxels from the grid boundary (6-connectivity): what it reaches is outside,
   everything else (barrier, enclosed interior, inner shells) is inside;
4. marching cubes of g = udf - offset on the outside side: the outer `offset`-surface, oriented outward.
Holes narrower than about 2 * offset voxels are closed; wider holes let the fill in, giving a thin closed
shell around the open sheet (still watertight). Inner shells vanish because they are never reached.

Which solid is stored (`make_watertight`, the `path` of a `Solid`):
- `closed`: an input made of closed bodies keeps its exact surface (sharp edges kept). A mesh of several closed
  bodies (parts that interpenetrate, like the convex pieces of a decomposition, or an outer shell with an
  inverted inner one) is watertight edge-wise, but its faces inside other bodies are not surface and ray
  parity calls the overlaps outside; `exact_solid` replaces it by the boolean union of its outward bodies
  minus its inverted ones.
- `winding`: an open mesh that bounds a solid (a scan cut at the base, a bust open at the neck, a model missing
  a face): the distance to the input surface with the sign of {w > 0.5}, w its generalized winding number
  (`winding.py`); holes are capped where w crosses 0.5 across them: the caps (`hole_caps.py`) join the input
  in the distance query, so the stored zero level set is closed across the widest hole.
  Chosen when w is decisive (|w - 0.5| > 0.3) at a fraction >= `decisive` of probe points on both sides of
  the surface.
- `rebuild`: an open sheet (a plane, a leaf: w stays near 0.5 on one side) gets the thin closed shell above.
- `input`: mode `never` trusts the input (ray parity on it).
`mode="auto"` picks closed, else winding, else rebuild; `"winding"` picks closed, else winding; `"always"`
rebuilds every mesh; `"never"` trusts the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from scipy import ndimage

from d3ds2.fallbacks import warn_fallback
from d3ds2.geometry.sparse_sdf import (candidate_cells, cell_voxel_coords, compute_sparse_sdf, surface_distance,
                                       voxel_centres)
from d3ds2.geometry.hole_caps import hole_caps
from d3ds2.geometry.winding import WindingNumber, WindingSign, decisive_fraction

MODES = ("auto", "winding", "always", "never")


class WatertightError(RuntimeError):
    """The watertight surface could not be built (the message says why)."""


def is_closed_solid(mesh: trimesh.Trimesh) -> bool:
    """True when the mesh is watertight, winding-consistent and encloses a positive volume."""
    return bool(mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0)


def exact_solid(mesh: trimesh.Trimesh, stray_area: float = 0.01) -> trimesh.Trimesh | None:
    """The surface of the solid that a mesh of closed bodies encloses, or None when it is not made of closed
    bodies (or manifold3d, needed for several bodies, is missing or rejects one). One closed body: the mesh
    itself. Several: union of the outward bodies minus the union of the inverted ones (their cavities).
    Open fragments (stray triangles) are dropped when together they hold under ``stray_area`` of the area."""
    if is_closed_solid(mesh) and mesh.body_count == 1:
        return mesh
    closed, stray = [], 0.0
    for body in mesh.split(only_watertight=False):
        if body.is_watertight and body.is_winding_consistent:
            closed.append(body)
        else:
            stray += body.area
    if not closed or stray > stray_area * mesh.area:
        return None
    if len(closed) == 1:
        return closed[0] if is_closed_solid(closed[0]) else None
    try:
        import manifold3d as m3
    except ImportError as e:
        warn_fallback("watertight-manifold3d", f"watertight: manifold3d cannot be imported ({e}); meshes of "
                                               f"several closed bodies are rebuilt through the UDF instead of "
                                               f"merged exactly (slower, lossy). Fix: pip install manifold3d")
        return None
    solids: dict[bool, list] = {True: [], False: []}
    for body in closed:
        outward = body.volume > 0
        if not outward:
            body = body.copy()
            body.invert()
        part = m3.Manifold(m3.Mesh(vert_properties=np.asarray(body.vertices, np.float32),
                                   tri_verts=np.asarray(body.faces, np.uint32)))
        if part.status() != m3.Error.NoError:
            return None
        solids[outward].append(part)
    if not solids[True]:
        return None
    solid = m3.Manifold.batch_boolean(solids[True], m3.OpType.Add)
    if solids[False]:
        solid = m3.Manifold.batch_boolean([solid, *solids[False]], m3.OpType.Subtract)
    out = solid.to_mesh()
    verts = np.asarray(out.vert_properties[:, :3], np.float64)
    result = trimesh.Trimesh(verts, np.asarray(out.tri_verts), process=False)
    return result if len(result.faces) and is_closed_solid(result) else None


def rebuild_watertight(mesh: trimesh.Trimesh, resolution: int = 256, offset: float = 0.75,
                       backend: str = "auto") -> trimesh.Trimesh:
    """The outer `offset`-voxel iso-surface of the mesh's unsigned distance at `resolution` (see module doc);
    `backend` of the distance queries as in `surface_distance`."""
    from skimage.measure import marching_cubes

    if offset < 0.5:
        raise ValueError(f"offset {offset} voxels < 0.5 lets the flood fill leak through the surface")
    R, h = resolution, 2.0 / resolution
    query = surface_distance(mesh.vertices, mesh.faces, backend=backend)
    band = offset + 2.0
    cells = candidate_cells(query, R, band)
    coords = cell_voxel_coords(cells)
    udf = query.unsigned(voxel_centres(coords, R)) / h
    near = udf < band
    coords, udf = coords[near], udf[near]
    grid = np.full((R, R, R), band, np.float32)  # voxels far from the surface: outside-ish, > offset
    grid[coords[:, 0], coords[:, 1], coords[:, 2]] = udf
    barrier = grid < offset
    labels, _ = ndimage.label(~barrier)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0])
    del labels
    field = np.where(outside, grid - offset, -1.0).astype(np.float32)
    del grid, outside, barrier
    if field.min() >= 0 or field.max() <= 0:
        raise WatertightError(f"no surface at offset {offset} voxels of a {R}^3 grid (mesh too small or empty)")
    verts, faces, _, _ = marching_cubes(field, level=0.0, method="lewiner")
    # skimage already shares vertices between faces; merging by position would fuse distinct MC vertices
    out = trimesh.Trimesh(-1.0 + (verts + 0.5) * h, faces, process=False)
    if out.volume < 0:
        out.invert()
    if not out.is_watertight:
        raise WatertightError(f"marching cubes output at {R}^3 is not watertight")
    return out


@dataclass
class Solid:
    """The solid stored for one mesh. `path` in {closed, winding, rebuild, input} (module doc) and `reason` (why);
    `surface` is the mesh whose distance is stored (exact solid, input, or rebuilt shell); on the winding path
    `winding` gives its sign and `cap` (the caps of its holes, `hole_caps`) joins it in the distance query;
    `decisive` is the fraction of probes where w is far from 0.5 (None if not probed)."""

    path: str
    reason: str
    surface: trimesh.Trimesh
    winding: WindingNumber | None = None
    decisive: float | None = None
    cap: trimesh.Trimesh | None = None

    def query(self, nsamples: int = 3, backend: str = "auto"):
        """The distance/sign query of the stored SDF (`sparse_sdf.compute_sparse_sdf(query=...)`)."""
        vertices, faces = self.surface.vertices, self.surface.faces
        if self.cap is not None and len(self.cap.faces):
            vertices = np.concatenate([vertices, self.cap.vertices])
            faces = np.concatenate([faces, np.asarray(self.cap.faces) + len(self.surface.vertices)])
        distance = surface_distance(vertices, faces, nsamples, backend)
        return distance if self.winding is None else WindingSign(distance, self.winding)

    def stats(self) -> dict:
        """The manifest's record of the path: {mode, reason, decisive_fraction, cap_faces (winding path)}."""
        fraction = None if self.decisive is None else round(self.decisive, 4)
        out = {"mode": self.path, "reason": self.reason, "decisive_fraction": fraction}
        if self.cap is not None:
            out["cap_faces"] = int(len(self.cap.faces))
        return out


def choose_path(mesh: trimesh.Trimesh, mode: str = "auto", probe: float = 2 * 2.0 / 256,
                decisive: float = 0.8) -> Solid:
    """The path of `mesh` under `mode` (module doc), not yet rebuilt: on the rebuild path `surface` is the input.
    `probe`: distance (world units) of the winding-number probes from the surface; `decisive`: the fraction of
    decisive probes above which an open mesh is a solid (winding path)."""
    if mode not in MODES:
        raise ValueError(f"watertight.mode={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "never":
        return Solid("input", "watertight.mode=never: the input is trusted as a closed surface", mesh)
    if mode == "always":
        return Solid("rebuild", "watertight.mode=always", mesh)
    if (solid := exact_solid(mesh)) is not None:
        why = "closed solid" if solid is mesh else f"{mesh.body_count} closed bodies: their exact union"
        return Solid("closed", why, solid)
    winding = WindingNumber(mesh.vertices, mesh.faces)
    fraction, inward = decisive_fraction(mesh, winding, probe)
    flipped = ""
    if inward and (mode == "winding" or fraction >= decisive):  # an inside-out solid: w = -1 inside
        mesh = trimesh.Trimesh(mesh.vertices, np.asarray(mesh.faces)[:, ::-1], process=False)
        winding, flipped = WindingNumber(mesh.vertices, mesh.faces), "; faces pointed inward: flipped"
    if mode == "winding":
        return Solid("winding", "watertight.mode=winding" + flipped, mesh, winding, fraction)
    if fraction >= decisive:
        return Solid("winding", f"open; winding number decisive at {fraction:.1%} of probes (>= {decisive:.0%})"
                     + flipped, mesh, winding, fraction)
    return Solid("rebuild", f"open sheet; winding number decisive at only {fraction:.1%} of probes "
                 f"(< {decisive:.0%})", mesh, None, fraction)


def make_watertight(mesh: trimesh.Trimesh, mode: str = "auto", resolution: int = 256, offset: float = 0.75,
                    backend: str = "auto", decisive: float = 0.8) -> Solid:
    """The `Solid` of `mesh` under `mode` (module doc); the rebuild path is rebuilt at `resolution` with
    `offset` voxels, and the winding numbers are probed 2 voxels of that grid from the surface. On the winding
    path the holes' caps are meshed on that grid too; they end within about a voxel of it from their rims and lie well within a voxel of w = 0.5 elsewhere (w is smooth there)."""
    solid = choose_path(mesh, mode, 2 * 2.0 / resolution, decisive)
    if solid.path == "rebuild":
        solid.surface = rebuild_watertight(mesh, resolution, offset, backend)
    if solid.path == "winding":
        distance = surface_distance(solid.surface.vertices, solid.surface.faces, backend=backend)
        solid.cap = hole_caps(solid.surface, solid.winding, distance, resolution)
    return solid


def reference_surface(mesh: trimesh.Trimesh, resolution: int = 256, decisive: float = 0.8,
                      backend: str = "auto") -> trimesh.Trimesh:
    """The surface a reconstruction of ``mesh`` is scored against (watertight.mode=auto): its exact solid when it
    is made of closed bodies (faces buried inside other bodies are not surface); on the winding path the
    boundary of {w > 0.5}, the zero level set of the stored SDF at `resolution` (holes capped); the mesh itself
    otherwise (open sheets)."""
    from d3ds2.geometry.marching_cubes import sparse_marching_cubes

    solid = choose_path(mesh, "auto", 2 * 2.0 / resolution, decisive)
    if solid.path != "winding":
        return solid.surface
    solid.cap = hole_caps(solid.surface, solid.winding, surface_distance(solid.surface.vertices, solid.surface.faces,
                                                                         backend=backend), resolution)
    sdf = compute_sparse_sdf(solid.surface.vertices, solid.surface.faces, resolution,
                             query=solid.query(backend=backend))
    return sparse_marching_cubes(*sdf.voxels(), resolution)
