"""A small real corpus from installed packages, and procedural CSG shapes with sharp edges.

Real meshes ship inside PyPI wheels (no network): pyvista's examples (ant, airplane, nut, sphere),
pymeshfix's open Stanford bunny scan, and, when asked for, the ~1,200 object and robot-part meshes of
pybullet's `pybullet_data` (many open or non-manifold: data prep rebuilds them watertight). Procedural
shapes are manifold3d CSG of boxes, cylinders and spheres: watertight by construction, with sharp edges,
any number of them from a seed.
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings

import numpy as np
import trimesh

REAL_SOURCES = ("pyvista", "pymeshfix", "pybullet")
_MESH_SUFFIXES = (".obj", ".stl", ".ply", ".off")


def _source_missing(source: str, error: ImportError) -> None:
    warnings.warn(f"corpus: real={source} is asked for but its package cannot be imported ({error}); its meshes are "
                  f"left out. Fix: pip install {source}, or leave {source} out of real=", stacklevel=3)


def _pybullet_mesh_paths() -> dict[str, str]:
    """name -> path of the mesh files in pybullet_data, one per distinct file content (sorted by name)."""
    try:
        import pybullet_data
    except ImportError as e:
        _source_missing("pybullet", e)
        return {}
    root = pybullet_data.getDataPath()
    paths, seen = {}, set()
    for p in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if not p.lower().endswith(_MESH_SUFFIXES):
            continue
        with open(p, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            rel = os.path.splitext(os.path.relpath(p, root))[0]
            paths["pybullet_" + rel.replace(os.sep, "_")] = p
    return paths


def real_mesh_paths(sources: tuple[str, ...] = ("pyvista", "pymeshfix")) -> dict[str, str]:
    """name -> path of the real meshes shipped in installed packages, from `sources` (see REAL_SOURCES)."""
    unknown = set(sources) - set(REAL_SOURCES)
    if unknown:
        raise ValueError(f"unknown real mesh sources {sorted(unknown)}; choose from {REAL_SOURCES}")
    paths = {}
    if "pybullet" in sources:
        paths.update(_pybullet_mesh_paths())
    if "pyvista" in sources:
        try:
            import pyvista.examples as pv_examples

            root = os.path.dirname(pv_examples.__file__)
            for name in ("ant", "airplane", "nut", "sphere"):
                p = os.path.join(root, f"{name}.ply")
                if os.path.isfile(p):
                    paths[f"pyvista_{name}"] = p
        except ImportError as e:
            _source_missing("pyvista", e)
    if "pymeshfix" in sources:
        try:
            import pymeshfix.examples as fix_examples

            if os.path.isfile(fix_examples.bunny_scan):
                paths["bunny_scan"] = fix_examples.bunny_scan
        except ImportError as e:
            _source_missing("pymeshfix", e)
    return paths


def procedural_shape(seed: int) -> trimesh.Trimesh:
    """A watertight CSG shape: a union of 2-4 random primitives minus 0-2 others (deterministic in `seed`)."""
    import manifold3d as mf

    rng = np.random.default_rng(seed)

    def primitive():
        kind = rng.integers(3)
        size = rng.uniform(0.3, 1.0, 3)
        if kind == 0:
            p = mf.Manifold.cube(tuple(size), center=True)
        elif kind == 1:
            p = mf.Manifold.cylinder(float(size[2]), float(size[0] / 2), float(size[0] / 2), 48, center=True)
        else:
            p = mf.Manifold.sphere(float(size[0] / 2), 48)
        angles = rng.uniform(0, 90, 3) * (rng.random(3) < 0.5)
        return p.rotate(tuple(angles)).translate(tuple(rng.uniform(-0.35, 0.35, 3)))

    shape = primitive()
    for _ in range(rng.integers(1, 4)):
        shape = shape + primitive()
    for _ in range(rng.integers(0, 3)):
        cut = shape - primitive()
        if cut.volume() > 0.3 * shape.volume():
            shape = cut
    mesh = shape.to_mesh()
    return trimesh.Trimesh(np.asarray(mesh.vert_properties)[:, :3], np.asarray(mesh.tri_verts), process=True)


def write_corpus(out_dir: str, n_procedural: int = 8, seed: int = 0,
                 real: tuple[str, ...] = ("pyvista", "pymeshfix"), max_faces: int | None = None) -> list[str]:
    """Write the real meshes of `real` sources (binary .ply copies; those with more than `max_faces` faces
    or that trimesh cannot read are left out) and `n_procedural` CSG shapes (.obj) to `out_dir`; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, src in sorted(real_mesh_paths(tuple(real)).items()):
        try:
            mesh = trimesh.load(src, process=False, force="mesh")
        except Exception:  # a file of a package that trimesh cannot parse: not part of the corpus
            continue
        if len(mesh.faces) == 0 or (max_faces is not None and len(mesh.faces) > max_faces):
            continue
        dst = os.path.join(out_dir, f"{name}.ply")
        mesh.export(dst)
        written.append(dst)
    for i in range(n_procedural):
        dst = os.path.join(out_dir, f"csg_{seed + i:04d}.obj")
        procedural_shape(seed + i).export(dst)
        written.append(dst)
    return written
