"""Pick the real meshes of the VAE training run and split them into training and held-out sets.

`python benchmarks/vae_corpus_split.py CORPUS_DIR OUT_DIR --random-urdfs 150 --held-out 0.06`
CORPUS_DIR is `python -m data_prep.corpus out=CORPUS_DIR n_procedural=0 real=[pyvista,pymeshfix,pybullet]
max_faces=20000`. Meshes with fewer than 200 faces, flatter than 1:20, or (with --closed-only)
not closed solids are left out (data prep would rebuild those: a marching-cubes surface of ~10^5 faces whose
SDF costs ~20x more); pybullet's random_urdfs objects are subsampled; the split is by a hash of the file name (reproducible, independent of
the order of files). Copies go to OUT_DIR/train and OUT_DIR/val.
"""
import argparse
import glob
import hashlib
import os
import shutil

import trimesh

from d3ds2.geometry.normalize import BadMeshError, clean_mesh
from d3ds2.geometry.watertight import is_closed_solid


def _unit_hash(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus")
    ap.add_argument("out")
    ap.add_argument("--random-urdfs", type=int, default=150, help="how many pybullet random_urdfs meshes")
    ap.add_argument("--closed-only", action="store_true", help="keep only watertight, consistently wound meshes")
    ap.add_argument("--held-out", type=float, default=0.06, help="fraction of real meshes held out")
    args = ap.parse_args()
    kept = []
    for path in sorted(glob.glob(os.path.join(args.corpus, "*"))):
        mesh = trimesh.load(path, process=False, force="mesh")
        extents = mesh.extents
        try:
            closed = is_closed_solid(clean_mesh(mesh)) if args.closed_only else True
        except BadMeshError:  # nothing left after cleaning: data prep would skip it too
            continue
        if len(mesh.faces) >= 200 and extents.min() > 0.05 * extents.max() and closed:
            kept.append(os.path.basename(path))
    random_urdfs = sorted((n for n in kept if n.startswith("pybullet_random_urdfs")), key=_unit_hash)
    chosen = [n for n in kept if not n.startswith("pybullet_random_urdfs")] + random_urdfs[: args.random_urdfs]
    counts = {"train": 0, "val": 0}
    for name in chosen:
        split = "val" if _unit_hash("split/" + name) < args.held_out else "train"
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
        shutil.copy(os.path.join(args.corpus, name), os.path.join(args.out, split, name))
        counts[split] += 1
    print(f"{len(kept)} usable of {len(glob.glob(os.path.join(args.corpus, '*')))}; chosen {len(chosen)}: {counts}")


if __name__ == "__main__":
    main()
