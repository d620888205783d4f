"""Sparse SDF timing on a ~100k-face closed real mesh (the Stanford bunny scan, made watertight, decimated).

python benchmarks/mesh_to_sdf.py --resolutions 512 1024 [--mesh2sdf 128]
Prints one line per run: resolution, seconds, peak RSS of a fresh child process (GB), cells, band voxels.
"""
import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import trimesh


def bench_mesh(n_faces: int = 100_000) -> trimesh.Trimesh:
    import fast_simplification

    from d3ds2.geometry.corpus import real_mesh_paths
    from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
    from d3ds2.geometry.watertight import rebuild_watertight

    mesh, _ = normalise_mesh(clean_mesh(trimesh.load(real_mesh_paths()["bunny_scan"])))
    solid = rebuild_watertight(mesh, 256)
    v, f = fast_simplification.simplify(np.asarray(solid.vertices, np.float32), np.asarray(solid.faces),
                                        target_reduction=1 - n_faces / len(solid.faces))
    return trimesh.Trimesh(v, f)


def _child(kind, R, v, f, q):
    t = time.perf_counter()
    if kind == "ours":
        from d3ds2.geometry.sparse_sdf import compute_sparse_sdf

        s = compute_sparse_sdf(v, f, R)
        extra = (len(s.cells), int((np.abs(s.sdf) < s.band).sum()))
    else:
        import mesh2sdf

        d = mesh2sdf.compute(v, f, R, fix=False)
        extra = (0, int((np.abs(d) < 4 * 2 / R).sum()))
    q.put((time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, *extra))


def run(kind, R, mesh):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(kind, R, np.asarray(mesh.vertices), np.asarray(mesh.faces), q))
    p.start()
    out = q.get()
    p.join()
    print(f"{kind:8s} R={R:5d} seconds={out[0]:.1f} peak_rss_GB={out[1]:.2f} cells={out[2]} band_voxels={out[3]}",
          flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--mesh2sdf", type=int, nargs="*", default=[128])
    a = ap.parse_args()
    mesh = bench_mesh()
    print(f"mesh: {len(mesh.faces)} faces, watertight={mesh.is_watertight}", flush=True)
    for R in a.mesh2sdf:
        run("mesh2sdf", R, mesh)
        run("ours", R, mesh)
    for R in a.resolutions:
        run("ours", R, mesh)
