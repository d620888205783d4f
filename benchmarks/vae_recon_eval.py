"""Reconstruct held-out shard samples with a trained VAE checkpoint and score the meshes.

Decodes each sample of ``--shards`` (a data folder's ``shards/`` with ``--split``, default val; or a glob / URLs; see
d3ds2/data/layout.py) at ``--resolution`` (posterior mean, EMA weights), extracts the mesh by
sparse-band marching cubes and writes all meshes to one ``--out`` .npz (``KEY/verts``, ``KEY/faces``).
With ``--meshes DIR`` (the held-out source meshes) it also prints Chamfer / F-score / normal consistency
against the normalised source mesh (its exact solid when it is made of closed bodies:
``watertight.reference_surface``). ``--ground-truth`` (no checkpoint) meshes the stored SDF itself: the
ceiling that any model decoding at that resolution can reach on these meshes.
Usage: python benchmarks/vae_recon_eval.py --ckpt RUN/checkpoints/last.ckpt --shards DATA/shards --out recon.npz
       python benchmarks/vae_recon_eval.py --ground-truth --shards DATA/shards --out gt.npz --recon gt.npz --meshes DIR
       python benchmarks/vae_recon_eval.py --recon recon.npz --meshes DIR   (metrics only)
"""
from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np


def reconstruct(args) -> None:
    import torch

    from d3ds2.data.layout import shard_urls
    from d3ds2.data.sdf_transforms import sample_at_resolution
    from d3ds2.data.shards import ShardStream
    from d3ds2.geometry.marching_cubes import sparse_marching_cubes
    from d3ds2.vae import decode_latent, encode_sample, load_vae

    if not args.ground_truth:
        vae, cfg = load_vae(args.ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    arrays = {}
    urls = shard_urls(args.shards, args.split, hint="write them with `python -m data_prep input=MESHES output=DATA`")
    for sample in ShardStream(urls, shuffle_buffer=0, with_views=False, rank=0, world_size=1):
        s = sample_at_resolution(sample, args.resolution)
        if args.ground_truth:
            mesh = sparse_marching_cubes(s.coords, s.sdf, args.resolution)
        else:
            mesh, _, _ = decode_latent(vae, encode_sample(vae, s, float(cfg.data.sdf_scale)), args.resolution)
        arrays[f"{s.name}/verts"] = np.asarray(mesh.vertices, np.float32)
        arrays[f"{s.name}/faces"] = np.asarray(mesh.faces, np.int32)
        print(s.name, len(mesh.faces), flush=True)
    np.savez_compressed(args.out, **arrays)


def score(args) -> None:
    import trimesh

    from d3ds2.geometry.mesh_io import load_mesh
    from d3ds2.geometry.metrics import mesh_metrics
    from d3ds2.geometry.normalize import clean_mesh, normalise_mesh
    from d3ds2.geometry.watertight import reference_surface
    from d3ds2.data.mesh_sample import sample_key

    rec = np.load(args.recon)
    keys = sorted({k.split("/")[0] for k in rec.files})
    sources = {sample_key(p): p for p in glob.glob(str(Path(args.meshes) / "*"))}
    rows = []
    for key in keys:
        ref = reference_surface(normalise_mesh(clean_mesh(load_mesh(sources[key])), 0.95)[0])
        pred = trimesh.Trimesh(rec[f"{key}/verts"], rec[f"{key}/faces"], process=False)
        m = mesh_metrics(pred, ref, 100_000, (0.01, 0.02)) if len(pred.faces) else {"fscore@0.01": 0.0}
        rows.append({"key": key, "source": Path(sources[key]).name, **m})
        print(json.dumps(rows[-1]), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0] if k not in ("key", "source")}
    print(json.dumps({"mean": mean, "n": len(rows)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt")
    ap.add_argument("--ground-truth", action="store_true", help="mesh the stored SDF instead of a reconstruction")
    ap.add_argument("--shards", help="data shards: a folder (its SPLIT-*.tar), a glob or URLs")
    ap.add_argument("--split", default="val", choices=["train", "val"], help="the split read from a --shards folder")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--out")
    ap.add_argument("--recon")
    ap.add_argument("--meshes")
    args = ap.parse_args()
    if args.ckpt or args.ground_truth:
        reconstruct(args)
    if args.recon and args.meshes:
        score(args)


if __name__ == "__main__":
    main()
