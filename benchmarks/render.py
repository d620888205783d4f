"""45 conditioning renders at 1024^2 of a real mesh (bunny scan): python benchmarks/render.py [--views 45 --size 1024]."""
import argparse
import time

import trimesh

from d3ds2.geometry.corpus import real_mesh_paths
from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
from d3ds2.geometry.render import render_views

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=45)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    mesh, _ = normalise_mesh(clean_mesh(trimesh.load(real_mesh_paths()["bunny_scan"])))
    t = time.perf_counter()
    images, cams = render_views(mesh, a.views, a.size, seed=0)
    t_render = time.perf_counter() - t
    from d3ds2.data.shard_format import _png

    t = time.perf_counter()
    for im in images:
        _png(im)
    print(f"faces={len(mesh.faces)} views={a.views} size={a.size} render_s={t_render:.1f} "
          f"png_s={time.perf_counter() - t:.1f}")
