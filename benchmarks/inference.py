"""Inference time and peak GPU memory per stage with random-weight full-size models (GPU).

Models: DINOv2-L/14 with registers (random, transformers config), occupancy VAE (193M), index DiT (560M),
SS-DiT v1.1 (509M, SSA) for 512 and 1024, sparse SDF VAE (37.9M; 1024: chunks of 32³ cells). Random weights
make the index stage's occupancy meaningless, so the sparse stages run on sphere shells with the paper's
average token counts (10,655 at 512, 45,904 at 1024); everything else is the pipeline's own code
(d3ds2.pipeline). Steps: dense 50, 512: 30, 1024: 15, CFG batched (guidance 7). One pass per process: the
first VAE decode of a process includes the Triton compilation of the sparse-convolution kernels.
Writes OUT/inference.{json,md} (OUT/inference_offload.* with --offload).
Usage: python benchmarks/inference.py --out OUT [--offload] [--weights bfloat16]
"""
from __future__ import annotations

import argparse
import json

import torch
from harness import markdown_table, write_outputs

from dit_step import shell_coords  # run as a script: benchmarks/ is on sys.path
from d3ds2.models.conditioner import DINOV2_L_REG_CONFIG, ImageConditioner
from d3ds2.models.dense_dit import DenseDiT
from d3ds2.models.dense_vae import DenseShapeVAE
from d3ds2.models.sparse_dit import SparseDiT
from d3ds2.models.sparse_sdf_vae import SparseSDFVAE
from d3ds2.pipeline import ImageTo3DPipeline, SparseStage, StageSampling, cast_parameters

SSA_V11 = {"m_cmp": 8, "m_slc": 8, "topk": 8, "compression": "v1"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for inference[_offload].json / .md")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--weights", default="bfloat16")
    ap.add_argument("--tokens512", type=int, default=10655)
    ap.add_argument("--tokens1024", type=int, default=45904)
    args = ap.parse_args()
    dev = torch.device("cuda")
    conditioner = ImageConditioner(config=DINOV2_L_REG_CONFIG)  # transformers builds it (CPU)
    with torch.device(dev):  # random init of the rest on the GPU (seconds, not minutes on the CPU)
        models = [conditioner, DenseShapeVAE(), DenseDiT(), SparseDiT(attention="ssa", ssa=SSA_V11),
                  SparseSDFVAE(chunk_size=None), SparseDiT(attention="ssa", ssa=SSA_V11, pe_factor=0.5),
                  SparseSDFVAE(chunk_size=32)]
    if args.offload:  # the pipeline expects offloaded models on the CPU
        models = [cast_parameters(m, getattr(torch, args.weights)).cpu() for m in models]
        torch.cuda.empty_cache()
    cond, index_vae, index_dit, dit512, vae512, dit1024, vae1024 = models
    zero, one = torch.zeros(16), torch.ones(16)
    pipe = ImageTo3DPipeline(
        cond, index_vae, index_dit,
        SparseStage(dit512, vae512, zero, one, 512), SparseStage(dit1024, vae1024, zero, one, 1024),
        device=dev, offload=args.offload, weights_dtype=args.weights,
    )
    resident = torch.cuda.memory_allocated(dev) / 2**30
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 4, 518, 518)
    images[:, 3] = 1.0
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        tokens, masks = pipe._stage("condition", [pipe.conditioner], pipe._condition, images)
        pipe._stage("index DiT + decode", [pipe.index_dit, pipe.index_vae], pipe._index, tokens, StageSampling(50, 6.0, 7.0), gen)
        for s, n, grid, sampling, name in [(pipe.stage_512, args.tokens512, 64, StageSampling(30, 6.0, 7.0), "512"),
                                           (pipe.stage_1024, args.tokens1024, 128, StageSampling(15, 8.0, 7.0), "1024")]:
            cells = shell_coords(n, grid, 1, "cpu")
            lat = pipe._stage(f"sparse DiT {name}", [s.dit], pipe._sparse, s, cells, tokens, masks, 1, sampling, gen, name)
            pipe._stage(f"VAE decode {name}", [s.vae], pipe._decode, s, lat)
    out = {"offload": args.offload, "weights": args.weights, "resident_weights_gib": resident,
           "stages": [{"name": r.name, "seconds": r.seconds, "peak_gib": r.peak_gib, "info": r.info} for r in pipe.reports]}
    print(json.dumps(out, indent=1))
    table = markdown_table(["stage", "work", "s", "peak GiB (weights incl.)"],
                           [[r["name"], ", ".join(f"{k} {v}" for k, v in r["info"].items()), f"{r['seconds']:.2f}",
                             f"{r['peak_gib']:.2f}"] for r in out["stages"]])
    write_outputs(args.out, "inference_offload" if args.offload else "inference", table, out)


if __name__ == "__main__":
    main()
