"""Sparse SDF timing on a ~100k-face closed real mesh (benchmarks/bench_mesh.py), vs mesh2sdf (dense).

PYTHONPATH=$PWD python benchmarks/mesh_to_sdf.py [--resolutions 512 1024] [--mesh2sdf 128 256]
Each run is a fresh child process; prints resolution, wall and CPU seconds (user + system, all threads;
the CPU figure is the one to compare on a shared machine), its peak RSS (GB), cells, band voxels and,
for mesh2sdf resolutions, the largest |difference| between the two methods on the band voxels (voxels).
"""
import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mesh import bench_mesh  # noqa: E402


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(kind, R, v, f, q):
    import mesh2sdf

    from d3ds2.geometry.sparse_sdf import cell_voxel_coords, compute_sparse_sdf

    t, cpu = time.perf_counter(), _cpu_seconds()  # imports excluded; building the BVH included
    if kind == "ours":
        s = compute_sparse_sdf(v, f, R)
        seconds = (time.perf_counter() - t, _cpu_seconds() - cpu)
        coords, values = cell_voxel_coords(s.cells), s.sdf.reshape(-1)
        band = np.abs(values) < s.band
        result = (len(s.cells), int(band.sum()), coords[band], values[band])
    else:
        # mesh2sdf samples at -1 + i * 2/R: shift by half a voxel to sample our voxel centres
        d = mesh2sdf.compute(v - 1.0 / R, f, R, fix=False) / (2.0 / R)
        seconds = (time.perf_counter() - t, _cpu_seconds() - cpu)
        result = (0, int((np.abs(d) < 4).sum()), None, d)
    q.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, *result))


def run(kind, R, v, f):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, R, v, f, q))
    p.start()
    out = q.get()
    p.join()
    print(f"{kind:8s} R={R:5d} seconds={out[0][0]:.1f} cpu_seconds={out[0][1]:.1f} peak_rss_GB={out[1]:.2f} cells={out[2]} band_voxels={out[3]}",
          flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--mesh2sdf", type=int, nargs="*", default=[128, 256])
    a = ap.parse_args()
    mesh = bench_mesh()
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    print(f"mesh: {len(f)} faces, watertight={mesh.is_watertight}", flush=True)
    for R in a.mesh2sdf:
        dense = run("mesh2sdf", R, v, f)[5]
        _, _, _, _, coords, values = run("ours", R, v, f)
        diff = np.abs(values - dense[coords[:, 0], coords[:, 1], coords[:, 2]])
        print(f"  R={R}: max |ours - mesh2sdf| on our band voxels = {diff.max():.4f} voxels", flush=True)
    for R in a.resolutions:
        run("ours", R, v, f)
