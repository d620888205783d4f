"""The built-in end-to-end example behind ``make demo`` (CPU, a few minutes).

Each stage is the real entry point with a small config; outputs go under ``out`` (default demo_out/).
Usage: ``python -m d3ds2.demo out=demo_out``.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _stage(name: str, args: list[str]) -> None:
    print(f"\n=== {name}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    print(f"=== {name} done in {time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    out = Path(opts.get("out", "demo_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meshes, data = out / "meshes", out / "data"
    _stage("corpus: real meshes from installed packages + procedural CSG shapes",
           ["-m", "data_prep.corpus", f"out={meshes}", "n_procedural=3"])
    _stage("data prep: watertight, sparse SDF, sharp edges, renders, shards",
           ["-m", "data_prep", f"input={meshes}", f"output={data}", "resolutions=[128]", "views=4",
            "render.size=256", "watertight.resolution=128", "samples_per_shard=4", "workers=2"])
    print(f"\nDemo finished; everything is under {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
