"""45 conditioning renders at 1024^2 of the ~100k-face benchmark mesh (benchmarks/bench_mesh.py), PNG included.

PYTHONPATH=$PWD python benchmarks/render.py [--views 45 --size 1024]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mesh import bench_mesh  # noqa: E402

from d3ds2.data.shard_format import encode_png  # noqa: E402
from d3ds2.geometry.render import render_views  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=45)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    mesh = bench_mesh()
    t = time.perf_counter()
    images, cams = render_views(mesh, a.views, a.size, seed=0)
    t_render = time.perf_counter() - t
    t = time.perf_counter()
    for im in images:
        encode_png(im)
    t_png = time.perf_counter() - t
    print(f"faces={len(mesh.faces)} views={a.views} size={a.size} render_s={t_render:.1f} png_s={t_png:.1f} "
          f"total_s={t_render + t_png:.1f}")
