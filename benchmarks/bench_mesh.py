"""The ~100k-face closed real benchmark mesh: the Stanford bunny scan (pymeshfix), made watertight at 256^3,
decimated to 100k faces (fast-simplification), re-closed with pymeshfix (decimation opens a few seams)."""
import numpy as np
import trimesh


def bench_mesh(n_faces: int = 100_000) -> trimesh.Trimesh:
    import fast_simplification
    import pymeshfix

    from d3ds2.geometry.corpus import real_mesh_paths
    from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
    from d3ds2.geometry.watertight import is_closed_solid, rebuild_watertight

    mesh, _ = normalise_mesh(clean_mesh(trimesh.load(real_mesh_paths()["bunny_scan"])))
    solid = rebuild_watertight(mesh, 256)
    v, f = fast_simplification.simplify(np.asarray(solid.vertices, np.float32), np.asarray(solid.faces),
                                        target_reduction=1 - n_faces / len(solid.faces))
    fix = pymeshfix.MeshFix(np.asarray(v, np.float64), np.asarray(f, np.int32))
    fix.repair()
    out = trimesh.Trimesh(fix.points, fix.faces)
    if not is_closed_solid(out):
        raise RuntimeError("benchmark mesh is not a closed solid after repair")
    return out
