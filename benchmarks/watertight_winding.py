"""Winding-number solids vs today's watertight step on a corpus of closed, cut-open, holed and multi-body meshes.

    PYTHONPATH=$PWD python benchmarks/watertight_winding.py --resolution 512 --out winding.json

Corpus (built in memory, nothing written): manifold3d CSG solids and the meshes shipped in the pyvista /
pymeshfix wheels (`geometry.corpus`), each as is, cut by a plane (open, no cap), and with holes of several radii
punched out; two multi-body meshes (a cut solid beside a closed one, two interpenetrating cut solids); two open
sheets (a plane, a curved leaf) that must keep the thin-shell rebuild.

Per mesh, timed interleaved (the order alternates between meshes; the CPU is shared):
  baseline: today's recipe, exact solid of closed bodies else the thin-shell rebuild at `--watertight` (256),
            then the sparse SDF at `--resolution` (ray parity);
  winding:  `make_watertight(mode=auto)` (closed / winding with the holes' caps meshed at `--watertight` /
            rebuild) then the sparse SDF at `--resolution`.
Accuracy on the winding path, on band voxels (|sdf| < band) of the stored field: sign agreement with libigl's
exact float64 winding number (`igl.winding_number`, a plain sum over triangles) and |SDF error| against the
float64 distance to the input triangles and the caps (`igl.point_mesh_squared_distance`) with that sign, in
voxels, on `--samples` voxels drawn uniformly over the band and as many nearest the holes' rims (boundary
edges); `cap_middle`: band voxels farther than 4 voxels from the input (stored only for the caps), and
`watertight`: whether the zero level set of the stored field is closed (sparse marching cubes). Closed meshes:
the baseline and new fields are compared cell for cell. JSON per mesh and a summary to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import trimesh

from d3ds2.geometry.corpus import procedural_shape, real_mesh_paths
from d3ds2.geometry.hole_caps import boundary_points
from d3ds2.geometry.marching_cubes import sparse_marching_cubes
from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
from d3ds2.geometry.sparse_sdf import compute_sparse_sdf, voxel_centres
from d3ds2.geometry.watertight import exact_solid, make_watertight, rebuild_watertight


def _cut(mesh: trimesh.Trimesh, origin, normal) -> trimesh.Trimesh:
    """The faces of `mesh` whose centroid is on the positive side of the plane (left open, a jagged rim)."""
    keep = (mesh.triangles_center - np.asarray(origin, float)) @ np.asarray(normal, float) > 0
    out = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    out.remove_unreferenced_vertices()
    return out


def _punch(mesh: trimesh.Trimesh, radius: float, rng, holes: int = 2) -> trimesh.Trimesh:
    """`mesh` without the faces whose centroid lies within `radius` of `holes` random surface points."""
    centres = mesh.sample(holes, seed=int(rng.integers(1 << 31)))
    keep = np.ones(len(mesh.faces), bool)
    for c in centres:
        keep &= np.linalg.norm(mesh.triangles_center - c, axis=1) > radius
    out = trimesh.Trimesh(mesh.vertices, mesh.faces[keep], process=False)
    out.remove_unreferenced_vertices()
    return out


def build_corpus(n_procedural: int, seed: int = 0) -> dict[str, trimesh.Trimesh]:
    rng = np.random.default_rng(seed)
    base = {f"csg{i}": procedural_shape(seed + i) for i in range(n_procedural)}
    for name, path in real_mesh_paths().items():
        base[name] = trimesh.load(path, process=False, force="mesh")
    corpus = {}
    for name, mesh in base.items():
        mesh, _ = normalise_mesh(clean_mesh(mesh), 0.95)
        mesh = trimesh.Trimesh(mesh.vertices, mesh.faces)  # merged vertices: cuts and holes make real boundaries
        corpus[name] = mesh
        normal = rng.normal(size=3)
        corpus[f"{name}_cut"] = _cut(mesh, mesh.centroid + rng.uniform(0.1, 0.4) * normal / np.linalg.norm(normal),
                                     -normal)
        if len(mesh.faces) < 4000:  # holes need faces smaller than their radius: subdivide coarse meshes
            mesh = mesh.subdivide_to_size(0.05)
        for r in (0.05, 0.15, 0.3):
            corpus[f"{name}_holes{r}"] = _punch(mesh, r, rng)
    a, b = corpus["csg0"], corpus["csg1"]
    corpus["multi_cut_beside_closed"] = trimesh.util.concatenate([
        _cut(a.copy().apply_scale(0.5).apply_translation([-0.45, 0, 0]), [-0.45, 0.1, 0], [0, -1, 0]),
        b.copy().apply_scale(0.45).apply_translation([0.45, 0, 0])])
    corpus["multi_interpenetrating_cut"] = trimesh.util.concatenate([
        _cut(a.copy().apply_translation([-0.2, 0, 0]), [0, 0, 0.25], [0, 0, -1]),
        _cut(b.copy().apply_translation([0.2, 0, 0]), [0, -0.25, 0], [0, 1, 0])])
    plane = trimesh.creation.box((1.8, 1.8, 1e-3)).subdivide_to_size(0.05)
    corpus["sheet_plane"] = trimesh.Trimesh(plane.vertices, plane.faces[plane.triangles_center[:, 2] > 0])
    leaf = corpus["sheet_plane"].copy()
    v = leaf.vertices.copy()
    v[:, 2] = 0.3 * (v[:, 0] ** 2 - 0.5 * v[:, 1] ** 2)
    corpus["sheet_leaf"] = trimesh.Trimesh(v, leaf.faces)
    out = {}
    for name, mesh in corpus.items():  # renormalise (cuts shrink the bbox) and drop empty results
        if len(mesh.faces) >= 4:
            out[name], _ = normalise_mesh(clean_mesh(mesh), 0.95)
    return out


def _baseline(mesh, R, W):
    solid = exact_solid(mesh)
    path = "closed" if solid is not None else "rebuild"
    solid = solid if solid is not None else rebuild_watertight(mesh, W)
    return path, compute_sparse_sdf(np.asarray(solid.vertices), np.asarray(solid.faces), R)


def _winding(mesh, R, W):
    made = make_watertight(mesh, "auto", W)
    s = made.surface
    return made, compute_sparse_sdf(np.asarray(s.vertices), np.asarray(s.faces), R, query=made.query())


def accuracy(mesh, cap, sdf, R, samples, rng) -> dict:
    import igl
    from scipy.spatial import cKDTree

    coords, values = sdf.voxels()
    band = np.flatnonzero(np.abs(values) < sdf.band)
    picks = {"uniform": rng.choice(band, min(samples, len(band)), replace=False)}
    rim = boundary_points(mesh, 1.0 / R)
    if len(rim):
        d, _ = cKDTree(rim).query(voxel_centres(coords[band], R))
        picks["rim"] = band[np.argsort(d)[:samples]]
    V, F = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
    both = trimesh.util.concatenate([mesh, cap]) if cap is not None and len(cap.faces) else mesh
    BV, BF = np.asarray(both.vertices, np.float64), np.asarray(both.faces, np.int64)
    d_input = np.sqrt(igl.point_mesh_squared_distance(voxel_centres(coords[band], R).astype(np.float64), V, F)[0])
    middle = band[d_input > 4 * 2.0 / R]
    if len(middle):
        picks["cap_middle"] = rng.choice(middle, min(samples, len(middle)), replace=False)
    out = {"watertight": bool(sparse_marching_cubes(coords, values, R).is_watertight)}
    for kind, idx in picks.items():
        p = voxel_centres(coords[idx], R).astype(np.float64)
        w = igl.winding_number(V, F, p)
        dist = np.sqrt(igl.point_mesh_squared_distance(p, BV, BF)[0]) / (2.0 / R)
        ref = np.where(w > 0.5, -dist, dist)
        err = np.abs(values[idx] - ref)
        out[kind] = {"voxels": int(len(idx)), "sign_agree": float(np.mean((values[idx] < 0) == (w > 0.5))),
                     "sdf_err_p99": float(np.quantile(err, 0.99)), "sdf_err_max": float(err.max()),
                     "w_within_0.05_of_half": float(np.mean(np.abs(w - 0.5) < 0.05))}
    return out


def _same_field(a, b) -> dict:
    if a.cells.shape == b.cells.shape and (a.cells == b.cells).all():
        diff = np.abs(a.sdf - b.sdf)
        return {"same_cells": True, "bit_identical": bool((diff == 0).all()), "max_diff_voxels": float(diff.max())}
    return {"same_cells": False}


def _write(rows: dict, args) -> dict:
    """Summary of the rows so far; writes both to args.out."""
    wind = [r for r in rows.values() if r["path"]["mode"] == "winding"]
    summary = {
        "meshes": len(rows), "paths": {m: sum(r["path"]["mode"] == m for r in rows.values())
                                       for m in ("closed", "winding", "rebuild")},
        "winding_min_sign_agree": {k: min((r["accuracy"][k]["sign_agree"] for r in wind if k in r["accuracy"]),
                                          default=None) for k in ("uniform", "rim", "cap_middle")},
        "winding_max_sdf_err_p99": {k: max((r["accuracy"][k]["sdf_err_p99"] for r in wind if k in r["accuracy"]),
                                           default=None) for k in ("uniform", "rim", "cap_middle")},
        "winding_all_watertight": all(r["accuracy"]["watertight"] for r in wind),
        "closed_all_bit_identical": all(r["closed_unchanged"].get("bit_identical", False)
                                        for r in rows.values() if "closed_unchanged" in r),
        "time_ratio_total": round(sum(r["winding_s"] for r in rows.values())
                                  / sum(r["baseline_s"] for r in rows.values()), 3),
        "time_ratio_median": float(np.median([r["ratio"] for r in rows.values()])),
        "time_ratio_max": max(r["ratio"] for r in rows.values()),
    }
    result = {"resolution": args.resolution, "watertight_resolution": args.watertight,
              "machine": platform.processor() or platform.machine(), "summary": summary, "meshes": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--watertight", type=int, default=256, help="watertight.resolution (rebuild grid, probes)")
    ap.add_argument("--procedural", type=int, default=3)
    ap.add_argument("--samples", type=int, default=20000, help="band voxels checked per kind (uniform, rim)")
    ap.add_argument("--only", nargs="*", help="names to run (default: all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    R, W = args.resolution, args.watertight
    corpus = build_corpus(args.procedural)
    if args.only:
        corpus = {k: v for k, v in corpus.items() if k in args.only}
    rng = np.random.default_rng(0)
    rows = {}
    for i, (name, mesh) in enumerate(corpus.items()):
        timed = {}
        for which in (("baseline", "winding") if i % 2 == 0 else ("winding", "baseline")):
            t = time.perf_counter()
            timed[which] = (_baseline if which == "baseline" else _winding)(mesh, R, W)
            timed[which + "_s"] = time.perf_counter() - t
        (old_path, old), (made, new) = timed["baseline"], timed["winding"]
        row = {"faces": len(mesh.faces), "boundary_edges": int(len(boundary_points(mesh, np.inf))),
               "path": made.stats(), "baseline_path": old_path, "baseline_s": round(timed["baseline_s"], 2),
               "winding_s": round(timed["winding_s"], 2),
               "ratio": round(timed["winding_s"] / timed["baseline_s"], 3),
               "band_voxels": int((np.abs(new.sdf) < new.band).sum())}
        if made.path == "winding":
            row["accuracy"] = accuracy(made.surface, made.cap, new, R, args.samples, rng)
        if made.path == "closed":
            row["closed_unchanged"] = _same_field(old, new)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        summary = _write(rows, args)  # after every mesh: a long run leaves its figures so far
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
