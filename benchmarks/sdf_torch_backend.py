"""Speed of the PyTorch distance backend for sparse SDFs (the data-prep path on a GPU machine without open3d).

`PYTHONPATH=$PWD python benchmarks/sdf_torch_backend.py --out torch_sdf.json MESH ...` (device). For each mesh:
the watertight step (rebuilt when open), then `compute_sparse_sdf` at --resolution with several chunk sizes,
checking that every chunk size gives the same cells and SDF (|Δ| < 1e-3 voxel). A procedural CSG shape is
always included.
"""
import argparse
import json
import time

import numpy as np
import torch
import trimesh

from d3ds2.geometry.corpus import procedural_shape
from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
from d3ds2.geometry.sparse_sdf import compute_sparse_sdf
from d3ds2.geometry.torch_distance import TorchSurfaceDistance
from d3ds2.geometry.watertight import make_watertight
from d3ds2.geometry.winding import WindingSign


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("meshes", nargs="*")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--out", default="torch_sdf.json")
    args = ap.parse_args()
    meshes = {"csg": procedural_shape(1)} | {p: trimesh.load(p, process=False, force="mesh") for p in args.meshes}
    results = {}
    for name, mesh in meshes.items():
        mesh, _ = normalise_mesh(clean_mesh(mesh), 0.95)
        t = time.perf_counter()
        made = make_watertight(mesh, "auto", args.resolution, 0.75, "torch")
        solid = made.surface
        _sync()
        row = {"faces": len(mesh.faces), "solid_faces": len(solid.faces), "watertight": made.path,
               "watertight_s": round(time.perf_counter() - t, 2)}
        ref = None
        for chunk in args.chunks:
            query = TorchSurfaceDistance(solid.vertices, solid.faces, 3, chunk=chunk)
            if made.winding is not None:  # an open solid: sign of its winding number
                query = WindingSign(query, made.winding)
            t = time.perf_counter()
            sdf = compute_sparse_sdf(solid.vertices, solid.faces, args.resolution, query=query)
            _sync()
            row[f"sdf_chunk{chunk}_s"] = round(time.perf_counter() - t, 2)
            if ref is None:
                ref, row["cells"] = sdf, len(sdf.cells)
            else:
                row[f"chunk{chunk}_same"] = bool(np.array_equal(sdf.cells, ref.cells)
                                                 and np.abs(sdf.sdf - ref.sdf).max() < 1e-3)
        results[name] = row
        print(name, row, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
