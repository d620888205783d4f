"""Training-step time, voxels/s and peak memory of the v1.1-size sparse SDF VAE (bf16 autocast, AdamW).

Synthetic batches of analytic shells (sphere / torus / box / sphere at the band layout of data prep).
Correctness first: the bf16 forward is compared with the fp32 forward on a 128³ sample.
Usage: python benchmarks/vae_step.py --out OUT [--configs 256x4 512x4 1024x1] [--steps 5]
                                     [--profile 256x2] [--skip-bench]
--profile RxB appends the CUDA kernels of one training step (torch.profiler, after warm-up) by total time.
"""
from __future__ import annotations

import argparse
import json

import torch
from harness import markdown_table, median_ms, write_outputs

from d3ds2.data.sdf_transforms import analytic_sample, collate
from d3ds2.models.sparse_sdf_vae import SparseSDFVAE
from d3ds2.models.vae_losses import VAELossWeights, vae_loss

SHAPES = ["sphere", "torus", "box", "sphere"]


def make_batch(resolution: int, batch: int, device):
    samples = [analytic_sample(SHAPES[i % len(SHAPES)], resolution) for i in range(batch)]
    return collate(samples, 8.0).to(device)


def step_fn(vae, opt, b, band):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, post = vae(b.inputs, target_coords=band)
        loss, terms = vae_loss(out, post, b.targets, VAELossWeights())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return loss, terms


def bench(resolution: int, batch: int, steps: int, **net_kw) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = SparseSDFVAE(**net_kw).to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    b = make_batch(resolution, batch, dev)
    band = b.targets.coords[b.targets.feats[:, 1] > 0.5] if net_kw.get("occupancy_head") else None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    last = {}

    def one_step():
        last["terms"] = step_fn(vae, opt, b, band)[1]

    dt = median_ms(one_step, warmup=2, iters=steps) / 1e3
    terms = last["terms"]
    decoded = float(terms["decoded_voxels"])
    return {"resolution": resolution, "batch": batch, "input_voxels": b.inputs.num_voxels,
            "decoded_voxels": int(decoded), "step_s": dt, "decoded_voxels_per_s": decoded / dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss),
            "variant": ",".join(f"{k}={v}" for k, v in net_kw.items()) or "default"}


def gathered_group_norm(feats, batch_ids, counts, groups: int, weight, bias, eps: float = 1e-5):
    """The previous SparseGroupNorm (baseline): per-sample statistics by index_add, gathered back to the
    voxels with ``stats[batch_ids]`` (a sorting index_put backward with ~N / B duplicates per row)."""
    n, c = feats.shape
    f = feats.float().view(n, groups, c // groups)
    count = (counts.clamp_min(1) * (c // groups)).float().view(-1, 1)
    mean = f.new_zeros(len(counts), groups).index_add_(0, batch_ids, f.sum(-1)) / count
    centred = f - mean[batch_ids].unsqueeze(-1)
    var = f.new_zeros(len(counts), groups).index_add_(0, batch_ids, centred.pow(2).sum(-1)) / count
    return (centred * torch.rsqrt(var[batch_ids] + eps).unsqueeze(-1)).view(n, c) * weight + bias


def group_norm_bench(voxels: int = 1_200_000, batch: int = 2, channels: int = 32, groups: int = 32) -> dict:
    """Forward + backward of the sparse GroupNorm at the VAE's first level (256^3 x 2): SparseGroupNorm
    (per-sample native group_norm) against the gathered formulation it replaced; outputs and grads compared."""
    from d3ds2.sparse import SparseTensor
    from d3ds2.sparse.nn import SparseGroupNorm

    dev = torch.device("cuda")
    coords = torch.zeros(voxels, 4, dtype=torch.int32, device=dev)
    coords[:, 0] = torch.arange(voxels, device=dev) * batch // voxels
    coords[:, 1:] = torch.stack(torch.unravel_index(torch.arange(voxels, device=dev) % 256**3, (256,) * 3), 1).int()
    x = torch.randn(voxels, channels, device=dev, requires_grad=True)
    gn = SparseGroupNorm(groups, channels).to(dev)
    st = SparseTensor(x, coords, batch, check=False)
    counts, ids = st.counts, st.batch_ids
    up = torch.randn(voxels, channels, device=dev)
    runs = {"SparseGroupNorm": lambda: gn(st).feats,
            "gathered (previous)": lambda: gathered_group_norm(x, ids, counts, groups, gn.weight, gn.bias, gn.eps)}
    out, grads = {}, {}
    for name, fn in runs.items():
        x.grad = None
        y = fn()
        y.backward(up)
        grads[name] = (y.detach(), x.grad.clone())

        def step(fn=fn):
            x.grad = None
            fn().backward(up)

        out[name] = {"fwd_bwd_ms": median_ms(step, warmup=3, iters=200)}
    (ya, ga), (yb, gb) = grads.values()
    out["max_abs_diff"] = {"out": float((ya - yb).abs().max()), "grad": float((ga - gb).abs().max())}
    return out


def kernel_profile(resolution: int, batch: int, top: int = 25) -> str:
    """Markdown table of the CUDA kernels of one training step at ``resolution`` x ``batch``, most time first."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = SparseSDFVAE().to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)
    b = make_batch(resolution, batch, dev)
    for _ in range(3):
        step_fn(vae, opt, b, None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_fn(vae, opt, b, None)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    lines = [f"### Kernels of one step at {resolution}^3 x {batch} ({b.inputs.num_voxels:,} input voxels): "
             f"{total / 1e3:.1f} ms of kernel time", "", "| kernel | calls | ms | share |", "|---|---|---|---|"]
    for e in events[:top]:
        name = e.key if len(e.key) < 90 else e.key[:87] + "..."
        lines.append(f"| `{name}` | {e.count} | {e.self_device_time_total / 1e3:.2f} | "
                     f"{e.self_device_time_total / total:.1%} |")
    return "\n".join(lines) + "\n"


def correctness() -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vae = SparseSDFVAE().to(dev).eval()
    for p in vae.decoder.out_layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for p in vae.encoder.out_layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b = make_batch(128, 2, dev)
    with torch.no_grad():
        ref, _ = vae(b.inputs, sample=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = vae(b.inputs, sample=False)
        vae.chunk_size = 4
        chunked, _ = vae(b.inputs, sample=False)
    err = (out.sdf.feats.float() - ref.sdf.feats).abs()
    return {"bf16_vs_fp32_max_abs": float(err.max()), "bf16_vs_fp32_mean_abs": float(err.mean()),
            "sdf_mean_abs": float(ref.sdf.feats.abs().mean()),
            "chunked_vs_full_max_abs": float((chunked.sdf.feats - ref.sdf.feats).abs().max()),
            "same_voxels": bool(torch.equal(chunked.sdf.coords, ref.sdf.coords))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for vae_step.json and vae_step.md")
    ap.add_argument("--configs", nargs="+", default=["256x4", "512x4", "1024x1"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile", default=None, help="RxB: also list the kernels of one step at this size")
    ap.add_argument("--skip-bench", action="store_true", help="only the correctness check and --profile")
    ap.add_argument("--only-configs", action="store_true", help="no extra variants (occupancy head, 1024 options)")
    args = ap.parse_args()
    rows = []
    check = correctness()
    print(json.dumps(check), flush=True)
    variants = [((r, b), {}) for r, b in (map(int, c.split("x")) for c in args.configs)]
    variants += [((256, 4), {"occupancy_head": True}), ((1024, 1), {"train_chunk": 32}),
                 ((1024, 1), {"use_checkpoint": True})]
    variants = variants[:len(args.configs)] if args.only_configs else variants
    variants = [] if args.skip_bench else variants
    norm = group_norm_bench()
    print(json.dumps(norm), flush=True)
    for (r, b), kw in variants:
        try:
            row = bench(r, b, args.steps, **kw)
        except torch.OutOfMemoryError as e:
            row = {"resolution": r, "batch": b, "variant": ",".join(f"{k}={v}" for k, v in kw.items()) or "default",
                   "error": f"OOM: {str(e)[:120]}"}
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = [f"Correctness: {json.dumps(check)}", "",
             f"Sparse GroupNorm at 1.2M voxels x 32 channels, 2 samples, fwd+bwd ms (previous gathered form = "
             f"baseline): {json.dumps(norm)}", ""]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["resolution"], r["batch"], r["variant"], r["error"], "", "", "", ""])
        else:
            table.append([r["resolution"], r["batch"], r["variant"], f"{r['input_voxels']:,}", f"{r['decoded_voxels']:,}",
                          f"{r['step_s']:.3f}", f"{r['decoded_voxels_per_s'] / 1e6:.2f}M", f"{r['peak_gib']:.1f}"])
    lines.append(markdown_table(["R", "batch", "variant", "input voxels", "decoded voxels", "step (s)",
                                 "decoded voxels/s", "peak GiB"], table))
    if args.profile:
        lines += ["", kernel_profile(*map(int, args.profile.split("x")))]
    print(write_outputs(args.out, "vae_step", "\n".join(lines), {"check": check, "group_norm": norm, "rows": rows}))

if __name__ == "__main__":
    main()
