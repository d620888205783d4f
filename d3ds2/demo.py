"""The built-in end-to-end example behind ``make demo`` (CPU, a few minutes).

Real meshes (pyvista / pymeshfix samples + procedural CSG) -> data prep (watertight, sparse SDF at 128³,
sharp edges, 4 renders) -> a tiny sparse SDF VAE fitted to the bunny scan at 32³ -> its reconstruction with
metrics (a non-empty mesh, or the demo fails) -> latents -> tiny index VAE, index DiT and sparse DiT -> ``inference.py`` on a demo render
-> a mesh file. Every stage is the real entry point with a small config; outputs go under ``out``.
Usage: ``python -m d3ds2.demo out=demo_out`` (Hydra; d3ds2/configs/demo.yaml).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hydra
import trimesh
from omegaconf import DictConfig

from d3ds2.data.layout import DataLayout, shard_urls
from d3ds2.data.shards import read_tar

RES = 128  # data prep, latents and the DiTs
VAE_RES = 32  # the tiny VAE trains at 32³ on the bunny alone
VAE_STEPS = 150  # enough for the tiny VAE to decode a closed bunny (about 75 steps give the first surface)


def _stage(name: str, args: list[str]) -> None:
    print(f"\n=== {name}\n    python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    print(f"=== done in {time.perf_counter() - start:.1f} s", flush=True)


def _first_view(shards: str, dest: Path) -> Path:
    """Write the first rendered view (RGBA PNG) of the first train shard of the demo data to ``dest``."""
    first = read_tar(shard_urls(shards, "train")[0])[0]
    dest.write_bytes(first["view000.png"])
    return dest


@hydra.main(config_path="pkg://d3ds2.configs", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meshes, data, logs = out / "meshes", out / "data", out / "logs"
    shards = DataLayout(str(data)).shards_dir  # data prep's train-*.tar / val-*.tar
    run = [f"paths.root_dir={out}", "run_name=demo", "logger=csv", "callbacks.progress_bar.refresh_rate=0"]

    _stage("1/8 corpus: real meshes shipped in pyvista/pymeshfix + procedural CSG shapes",
           ["-m", "data_prep.corpus", f"out={meshes}", "n_procedural=3"])
    _stage(f"2/8 data prep: watertight, sparse SDF at {VAE_RES}³ and {RES}³, sharp edges, 4 renders, shards",
           ["-m", "data_prep", f"input={meshes}", f"output={data}", f"resolutions=[{VAE_RES},{RES}]", "views=4",
            "render.size=256", f"watertight.resolution={RES}", "samples_per_shard=4", "workers=2"])
    bunny = next(iter(sorted(meshes.glob("*bunny*")) or sorted(meshes.iterdir())))
    vae_data = out / "data_vae"
    _stage(f"3/8 the VAE's own data: {bunny.name} alone at {VAE_RES}³ (a tiny VAE learns one shape in a CPU minute)",
           ["-m", "data_prep", f"input={bunny}", f"output={vae_data}", f"resolutions=[{VAE_RES}]", "views=0",
            f"watertight.resolution={RES}", "val_fraction=0", "workers=1", "progress=false"])
    _stage(f"3/8 train a tiny sparse SDF VAE at {VAE_RES}³ on it",
           ["-m", "d3ds2.cli.train", "experiment=vae_tiny", f"data.train_shards={DataLayout(str(vae_data)).shards_dir}",
            f"data.resolutions=[{VAE_RES}]", f"data.val_resolution={VAE_RES}", "data.num_workers=0",
            f"trainer.max_steps={VAE_STEPS}", "trainer.val_check_interval=50", "callbacks.model_checkpoint.every_n_train_steps=50",
            *run])
    vae_run = logs / "vae_tiny" / "demo"
    reconstruction = out / "reconstruction.ply"
    _stage("4/8 reconstruct the real mesh through the VAE, with metrics",
           ["-m", "d3ds2.vae", "command=reconstruct", f"input={bunny}", f"ckpt={vae_run / 'checkpoints' / 'last.ckpt'}",
            f"resolution={VAE_RES}", f"out={reconstruction}"])
    if not reconstruction.is_file() or len(trimesh.load(reconstruction, force="mesh").faces) == 0:
        sys.exit(f"demo: the VAE reconstruction of {bunny.name} is empty: train longer (VAE_STEPS in {__file__})")
    _stage("5/8 encode the shards to latents (+ preprocessed views) and their statistics",
           ["-m", "data_prep.encode_latents", f"data={data}", f"resolution={RES}", f"vae={vae_run}", "features=images",
            "stats=false"])
    _stage("5/8 latent statistics", ["-m", "data_prep.latent_stats", f"data={data}", f"resolution={RES}"])
    _stage("6/8 train the tiny index (occupancy) VAE", ["-m", "d3ds2.cli.train", "experiment=index_vae_tiny", *run])
    _stage("7/8 train the tiny index DiT",
           ["-m", "d3ds2.cli.train", "experiment=index_dit_tiny", *run])
    _stage("7/8 train the tiny sparse DiT", ["-m", "d3ds2.cli.train", "experiment=dit_tiny", *run])
    image = _first_view(shards, out / "input_view.png")
    _stage("8/8 inference: image -> index DiT -> sparse DiT -> VAE decode -> mesh",
           ["-m", "d3ds2.cli.inference", f"image={image}", f"out={out / 'generated.glb'}", "device=cpu", "dense.steps=10",
            "sparse_512.steps=10", f"ckpt.index_dit={logs / 'index_dit_tiny' / 'demo'}",
            f"ckpt.sparse_dit_512={logs / 'dit_tiny' / 'demo'}", f"ckpt.vae_512={vae_run}"])
    print(f"\nDemo finished. Under {out}:\n  reconstruction.ply  (VAE reconstruction of {bunny.name})\n"
          f"  generated.glb       (generated from input_view.png)\n  logs/               (runs: configs, checkpoints, metrics)")


if __name__ == "__main__":
    main()
