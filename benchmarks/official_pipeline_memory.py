"""Peak GPU memory and time of the official Direct3D-S2 pipeline (512 and 1024, refiners included), low-VRAM
settings vs everything resident, one image, official step counts (50 / 30 / 15).

Models have the release's sizes and official layout (random weights unless --release gives a real folder);
the latent cells of both sparse stages are sphere shells with a chosen token count (random weights decode no
meaningful occupancy), so both modes see the same work. Modes:
  resident: every model on the GPU, dense refiner grids on the GPU, whole-grid VAE decode at 512
  low_vram: sequential offload (each model on the GPU only during its stage), refiner grids on the CPU,
            chunked VAE decode (--decode-chunk latent cells per axis)
Correctness first: both modes must give the same meshes (face counts within 1%); then median seconds over
--repeats runs after one warm-up run, and the peak of torch.cuda.max_memory_allocated over a whole call.

  python benchmarks/official_pipeline_memory.py --out results.json                      # GPU, full size
  python benchmarks/official_pipeline_memory.py --size tiny --device cpu --steps 2 --out r.json   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d3ds2.models.conditioner import DINOV2_L_REG_CONFIG, ImageConditioner
from d3ds2.official.config import ReleaseConfig, build_model, release_config
from d3ds2.pipeline import ImageTo3DPipeline, SparseStage, StageSampling

TARGET_GIB = {512: 3.0, 1024: 6.0}
TINY_DINO = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=518,
                 patch_size=14, num_register_tokens=4)


def tiny_release_config() -> dict:
    """The release config at small widths (index grid 4³, fine 32 / 64) for a CPU smoke run."""
    cfg = release_config("v1.1")
    cfg["dense_vae"]["params"].update(model_channels_encoder=[8, 16, 32], model_channels_decoder=[32, 16, 8],
                                      num_res_blocks_encoder=1, num_res_blocks_decoder=1,
                                      num_res_blocks_middle_encoder=1, num_res_blocks_middle_decoder=1)
    cfg["dense_dit"]["params"].update(resolution=1, model_channels=32, cond_channels=64, num_blocks=1, num_heads=2)
    for res, latent in (("512", 4), ("1024", 8)):
        cfg[f"sparse_vae_{res}"]["params"].update(model_channels_encoder=64, model_channels_decoder=64, num_heads_encoder=2,
                                                  num_heads_decoder=2, num_blocks_encoder=1, num_blocks_decoder=1,
                                                  resolution=latent)
        cfg[f"sparse_dit_{res}"]["params"].update(model_channels=64, cond_channels=64, num_blocks=1, num_heads=4,
                                                  resolution=latent)
    cfg["refiner"]["params"].update(block_out_channels=[4, 8], patch_size=12, feature_channels=4)
    cfg["refiner_1024"]["params"].update(block_out_channels=[4, 8], patch_size=16)
    return cfg


def randomise_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Small random weights everywhere (zero-initialised output layers would make every stage trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * min(0.02, 1.0 / p[0].numel() ** 0.5))
            elif "bias" in name:
                p.zero_()


def random_models(args) -> dict:
    """Official-size (or tiny) models with random weights and the conditioner, built once for both modes."""
    cfg = ReleaseConfig(Path("config.yaml"), tiny_release_config() if args.size == "tiny" else release_config("v1.1"))
    gen = torch.Generator().manual_seed(0)
    m = {}
    for sec in ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "sparse_vae_1024", "sparse_dit_1024",
                "refiner", "refiner_1024"):
        m[sec] = build_model(cfg, sec)
        randomise_(m[sec], gen)
    if args.backbone:
        m["conditioner"] = ImageConditioner(backbone=args.backbone)
    else:
        m["conditioner"] = ImageConditioner(config=TINY_DINO if args.size == "tiny" else DINOV2_L_REG_CONFIG)
    return m


def build_pipeline(args, models: dict | None, low_vram: bool) -> ImageTo3DPipeline:
    kw = dict(device=args.device, offload=low_vram, grid_device="cpu" if low_vram else args.device,
              weights_dtype=torch.float16 if args.device.startswith("cuda") else torch.float32)
    if args.release:
        pipe = ImageTo3DPipeline.from_pretrained(args.release, backbone=args.backbone, **kw)
    else:
        m = models
        for model in m.values():  # a previous resident run left them on the GPU
            model.to("cpu")

        def stage(res):
            dit, vae = m[f"sparse_dit_{res}"], m[f"sparse_vae_{res}"]
            return SparseStage(dit, vae, torch.zeros(16), torch.ones(16), vae.factor * vae.resolution)

        pipe = ImageTo3DPipeline(m["conditioner"], m["dense_vae"], m["dense_dit"], stage("512"), stage("1024"), index_threshold=0.1,
                                 mc_level=0.2, cells_from="mesh", refiner_512=m["refiner"], refiner_1024=m["refiner_1024"],
                                 **kw)
    for s in (pipe.stage_512, pipe.stage_1024):
        if low_vram:
            s.vae.chunk_size = args.decode_chunk
        elif s is pipe.stage_512:
            s.vae.chunk_size = None  # official: whole-grid decode at 512, 4³ chunks at 1024
    return pipe


def shell_cells(latent: int, tokens: int) -> torch.Tensor:
    """int32 (0, x, y, z) cells of a sphere shell one cell thick with about ``tokens`` cells."""
    radius = min((tokens / (4 * np.pi)) ** 0.5, latent / 2 - 1.5)
    g = torch.arange(latent, dtype=torch.float32) + 0.5 - latent / 2
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    xyz = torch.nonzero(((x * x + y * y + z * z).sqrt() - radius).abs() < 0.5).int()
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)


def test_image(path: Path) -> Path:
    from PIL import Image

    rgba = np.zeros((512, 512, 4), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 256) ** 2 < 180**2
    rgba[disc] = (200, 120, 40, 255)
    Image.fromarray(rgba).save(path)
    return path


def run_once(pipe, image, res, sampling, cells):
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    meshes = pipe([image], resolution=res, cells_512=cells[512], cells_1024=cells[1024] if res == 1024 else None, **sampling)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return time.perf_counter() - start, peak, meshes, [(r.name, round(r.seconds, 3), r.peak_gib) for r in pipe.reports]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--release", default=None, help="a real release folder instead of random official-size weights")
    ap.add_argument("--backbone", default=None, help="DINOv2-L-with-registers folder (default: random weights)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", default="official", help="'official' (50/30/15) or one step count for every stage")
    ap.add_argument("--tokens-512", type=int, default=10000, help="latent cells of the 512 stage (paper: ~10.7k)")
    ap.add_argument("--tokens-1024", type=int, default=40000, help="latent cells of the 1024 stage")
    ap.add_argument("--decode-chunk", type=int, default=16, help="low_vram: latent cells per axis of a decode chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    args = ap.parse_args(argv)
    n = (50, 30, 15) if args.steps == "official" else (int(args.steps),) * 3
    sampling = dict(dense=StageSampling(n[0], 6.0, 7.0), sparse_512=StageSampling(n[1], 6.0, 7.0),
                    sparse_1024=StageSampling(n[2], 8.0, 7.0))
    out = Path(args.out)
    image = test_image(out.with_suffix(".png"))
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "size": args.size,
               "steps": n, "torch": torch.__version__, "resolutions": {}}
    models = None if args.release else random_models(args)
    for res in args.resolutions:
        entry = {}
        meshes = {}
        for mode in ("low_vram", "resident"):
            pipe = build_pipeline(args, models, low_vram=mode == "low_vram")
            lat512, lat1024 = pipe.stage_512.vae.resolution, pipe.stage_1024.vae.resolution
            cells = {512: shell_cells(lat512, args.tokens_512 if args.size == "full" else 20),
                     1024: shell_cells(lat1024, args.tokens_1024 if args.size == "full" else 60)}
            for _ in range(args.warmup):  # kernels compiled, caches warm
                run_once(pipe, image, res, sampling, cells)
            runs = [run_once(pipe, image, res, sampling, cells) for _ in range(args.repeats)]
            meshes[mode] = runs[0][2][0]
            peaks = [r[1] for r in runs if r[1] is not None]
            entry[mode] = {"seconds_median": statistics.median(r[0] for r in runs), "seconds": [r[0] for r in runs],
                           "peak_gib": max(peaks) if peaks else None, "stages": runs[0][3],
                           "tokens": [int(len(cells[512])), int(len(cells[1024]))]}
            del pipe
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        fa, fb = len(meshes["resident"].faces), len(meshes["low_vram"].faces)
        entry["same_mesh"] = abs(fa - fb) <= 0.01 * max(fa, fb, 1)
        if not entry["same_mesh"]:
            raise SystemExit(f"{res}: low_vram mesh ({fb} faces) differs from resident ({fa} faces)")
        entry["time_ratio"] = entry["low_vram"]["seconds_median"] / entry["resident"]["seconds_median"]
        if entry["low_vram"]["peak_gib"] is not None:
            entry["meets_target"] = entry["low_vram"]["peak_gib"] <= TARGET_GIB[res] and entry["time_ratio"] <= 1.5
        results["resolutions"][str(res)] = entry
        print(f"{res}: resident {entry['resident']['seconds_median']:.1f} s / {entry['resident']['peak_gib']} GiB, "
              f"low_vram {entry['low_vram']['seconds_median']:.1f} s / {entry['low_vram']['peak_gib']} GiB, "
              f"ratio {entry['time_ratio']:.2f}", flush=True)
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
