"""A small real corpus from installed packages, and procedural CSG shapes with sharp edges.

Real meshes ship inside PyPI wheels (no network): pyvista's examples (ant, airplane, nut, sphere) and
pymeshfix's open Stanford bunny scan. Procedural shapes are manifold3d CSG of boxes, cylinders and spheres:
watertight by construction, with sharp edges, any number of them from a seed.
"""
from __future__ import annotations

import os

import numpy as np
import trimesh


def real_mesh_paths() -> dict[str, str]:
    """name -> path of the real meshes shipped in installed packages (those that are installed)."""
    paths = {}
    try:
        import pyvista.examples as pv_examples

        root = os.path.dirname(pv_examples.__file__)
        for name in ("ant", "airplane", "nut", "sphere"):
            p = os.path.join(root, f"{name}.ply")
            if os.path.isfile(p):
                paths[f"pyvista_{name}"] = p
    except ImportError:
        pass
    try:
        import pymeshfix.examples as fix_examples

        if os.path.isfile(fix_examples.bunny_scan):
            paths["bunny_scan"] = fix_examples.bunny_scan
    except ImportError:
        pass
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


def write_corpus(out_dir: str, n_procedural: int = 8, seed: int = 0, real: bool = True) -> list[str]:
    """Write the real meshes (as .ply copies) and `n_procedural` CSG shapes (.obj) to `out_dir`; return paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if real:
        for name, src in sorted(real_mesh_paths().items()):
            dst = os.path.join(out_dir, f"{name}.ply")
            trimesh.load(src, process=False).export(dst)
            written.append(dst)
    for i in range(n_procedural):
        dst = os.path.join(out_dir, f"csg_{seed + i:04d}.obj")
        procedural_shape(seed + i).export(dst)
        written.append(dst)
    return written
