"""Training-step time, MFU and peak memory of the 509M SS-DiT (v1.1) at the paper's token counts (GPU).

For each attention mode (SSA, full attention = FlashAttention varlen) x tokens per sample
(Table 1: 2,058 / 5,510 / 10,655 / 45,904) x gradient checkpointing, one AdamW step in bf16 autocast on a
token-budget batch (B = max(1, 32768 // N) samples of N tokens; batch 1 at 45,904). Tokens are the latent
cells nearest a sphere of radius 0.4 x grid (grid = resolution / 8 of the stage). Condition: 1374 dense
tokens. One model (and optimizer) per mode serves all its rows; every row is guarded, so an out-of-memory
or another error is recorded and the next row runs.
MFU = counted model FLOPs (matmuls of every Linear + attention scores/values of the mode's algorithm,
x3 for forward + backward, recomputation not counted) / step time / 989 TFLOP/s (H100/H200 dense bf16).

Before the rows: the bf16 GPU model vs float64 CPU check, the modulation kernels vs their reference on a
full-size problem, and a micro-benchmark of the attention kernels at 10,655 tokens x 3 (varlen flash vs
dense SDPA backends). After the rows: a torch.profiler breakdown of one step of the first mode at 10,655.
Modes: 'full' (FlashAttention varlen), 'ssa'; '-span' appended ('full-span', 'ssa-span') runs the varlen
attentions (cross, and self in 'full') through the project's Triton span kernel instead.
Writes OUT/dit_step.json and OUT/dit_step.md (the step table).
Usage: python benchmarks/dit_step.py --out OUT [--tokens 10655] [--modes full,full-span]
       [--profile-out prof.json] [--compile-row]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from harness import markdown_table, median_ms, write_outputs

from d3ds2.attention import varlen as varlen_module
from d3ds2.attention import varlen_attention
from d3ds2.models.sparse_dit import SparseDiT
from d3ds2.sparse import SparseTensor
import d3ds2.kernels.span_forward as span_forward
from d3ds2.kernels.modulation import (gated_residual, gated_residual_reference, modulated_layer_norm,
                                modulated_layer_norm_reference)

PEAK_BF16 = 989e12
TABLE1 = (2058, 5510, 10655, 45904)
LATENT_GRID = {2058: 32, 5510: 48, 10655: 64, 45904: 128}  # fine 256 / 384 / 512 / 1024 over 8
CTX = 1374
SSA_V11 = {"m_cmp": 8, "m_slc": 8, "topk": 8, "compression": "v1"}


def shell_coords(n: int, grid: int, batch: int, device) -> torch.Tensor:
    """n latent cells per sample closest to the sphere of radius 0.4 grid (int32 (b, x, y, z), sorted)."""
    g = torch.stack(torch.meshgrid(*[torch.arange(grid, device=device)] * 3, indexing="ij"), -1).view(-1, 3)
    d = ((g.float() + 0.5 - grid / 2).norm(dim=1) - 0.4 * grid).abs()
    cells = g[torch.argsort(d)[:n]]
    cells = cells[torch.argsort((cells[:, 0] * grid + cells[:, 1]) * grid + cells[:, 2])]
    rows = [torch.cat([torch.full((n, 1), b, device=device), cells], 1) for b in range(batch)]
    return torch.cat(rows).int()


def model_flops(model: SparseDiT, x: SparseTensor, mode: str) -> float:
    """Forward FLOPs (2 per multiply-add) of one step on x (all samples)."""
    c, n, b = model.model_channels, x.num_voxels, x.batch_size
    per_token_linear = 0
    ctx_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if "cross_attn.to_kv" in name:
                ctx_linear += m.in_features * m.out_features
            elif "adaLN" in name or "t_embedder" in name:
                continue  # per sample, negligible
            else:
                per_token_linear += m.in_features * m.out_features
    flops = 2 * per_token_linear * n + 2 * ctx_linear * CTX * b
    blocks = len(model.blocks)
    counts = x.counts.double()
    cross = 4 * n * CTX * c
    if mode.startswith("full"):
        self_attn = float(4 * (counts**2).sum() * c)
    else:  # SSA: compressed (all compressed tokens), selected (top-k blocks of <= 512), window (8^3)
        cfg = model.blocks[0].self_attn.config
        layout = model.blocks[0].self_attn.layout_for(x)
        nc = float(layout.cmp_counts.numel()) / b
        blk = n / max(1, layout.block_offsets.numel() - 1)
        self_attn = 4 * n * c * (nc + cfg.topk * blk + blk)
    return flops + blocks * (self_attn + cross)


def make_batch(n: int, device):
    grid = LATENT_GRID.get(n, 128 if n > 20000 else 64)
    batch = 1 if n > 20000 else max(1, 32768 // n)
    gen = torch.Generator(device=device).manual_seed(n)
    coords = shell_coords(n, grid, batch, device)
    x = SparseTensor(torch.randn(len(coords), 16, device=device, generator=gen), coords, batch)
    cond = torch.randn(batch, CTX, 1024, device=device, generator=gen)
    t = torch.rand(batch, device=device, generator=gen) * 1000
    return x, cond, t, torch.randn(x.feats.shape, device=device, generator=gen)


def train_step(model, opt, x, cond, t, target):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, cond).feats
    loss = (out.float() - target).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def bench_row(model, opt, mode: str, ckpt: bool, n: int, device) -> dict:
    """One row: warm-up then the median of timed steps (fewer at 45,904 tokens)."""
    warmup, steps = (1, 2) if n > 20000 else (2, 3)
    model.use_checkpoint = ckpt
    x, cond, t, target = make_batch(n, device)
    row = {"mode": mode, "ckpt": ckpt, "tokens": n, "batch": x.batch_size}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(warmup + steps):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = train_step(model, opt, x, cond, t, target)
            torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        row.update(oom=True, peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    except Exception as e:  # keep the other rows' numbers
        row.update(error=repr(e)[:400])
    if times:
        step = sorted(times)[len(times) // 2]
        try:
            flops = 3 * model_flops(model, x, mode)
        except Exception as e:
            flops, row["flops_error"] = float("nan"), repr(e)[:200]
        row.update(step_ms=step * 1e3, steps=len(times), step_ms_each=[round(t * 1e3, 1) for t in times],
                   tokens_per_s=x.num_voxels / step, tflops=flops / step / 1e12, mfu=flops / step / PEAK_BF16,
                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, loss=float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    del x, cond, t, target
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------
# checks and micro-benchmarks
# ----------------------------------------------------------------------------------------------
def check_model(device) -> str:
    """bf16 GPU forward of a small random-weight model vs float64 CPU; batch of two = each alone; SSA too."""
    lines = []
    for mode in ("full", "ssa"):
        torch.manual_seed(0)
        model = SparseDiT(model_channels=128, cond_channels=64, num_blocks=2, num_heads=8, num_kv_heads=2, attention=mode,
                          ssa={"m_cmp": 4, "m_slc": 8, "topk": 4} if mode == "ssa" else None)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        coords = torch.cat([shell_coords(300, 16, 1, "cpu"), shell_coords(150, 12, 1, "cpu") + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])
        x = SparseTensor(torch.randn(450, 16), coords, 2)
        t, cond = torch.tensor([100.0, 700.0]), torch.randn(2, 20, 64)
        ref = model.double()(x.replace(x.feats.double()), t.double(), cond.double()).feats.float()
        model = model.float().to(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x.to(device), t.to(device), cond.to(device)).feats.float().cpu()
            xa = SparseTensor(x.feats[:300], coords[:300], 1).to(device)
            alone = model(xa, t[:1].to(device), cond[:1].to(device)).feats.float().cpu()
        err = ((out - ref).norm() / ref.norm()).item()
        err_b = ((out[:300] - alone).norm() / alone.norm()).item()
        assert err < 0.03 and err_b < 0.03, (mode, err, err_b)
        lines.append(f"{mode}: bf16 GPU vs float64 CPU relative error {err:.2e}; batch-of-two vs alone {err_b:.2e}")
    return "\n".join(lines)


def check_modulation(device) -> str:
    """Triton modulation kernels vs the float64 reference at 10,655 x 3 tokens, C = 1024 (fwd + grads)."""
    gen = torch.Generator(device=device).manual_seed(1)
    counts = torch.tensor([10655, 10655, 10655], device=device)
    ids = torch.repeat_interleave(torch.arange(3, device=device), counts).int()
    x = torch.randn(ids.numel(), 1024, device=device, generator=gen) * 2 + 0.5
    mods = torch.randn(3, 3072, device=device, generator=gen)
    h = torch.randn(x.shape, device=device, generator=gen)
    w = torch.randn(x.shape, device=device, generator=gen)

    def run(fn_ln, fn_res, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, mods, h)]
        shift, scale, gate = leaves[1].chunk(3, dim=1)
        y = fn_ln(leaves[0], shift, scale, ids)
        out = fn_res(leaves[0], y * leaves[2], gate, ids)
        (out * w.to(dtype)).sum().backward()
        return [out] + [t.grad for t in leaves]

    ours = run(lambda *a: modulated_layer_norm(*a, backend="triton"), lambda *a: gated_residual(*a, backend="triton"), torch.float32)
    ref = run(modulated_layer_norm_reference, gated_residual_reference, torch.float64)
    errs = [((o.double() - r).norm() / r.norm()).item() for o, r in zip(ours, ref)]
    assert max(errs) < 1e-4, errs
    return "modulation kernels vs float64 (out, dx, dmods, dh): " + ", ".join(f"{e:.1e}" for e in errs)


SPAN_TILES = ((8, 64, 8, 64), (4, 128, 8, 64), (8, 128, 8, 128), (4, 64, 4, 128))  # (BM, BK, BQ, BKV), G = 16


def span_variant(cu: torch.Tensor, block_m: int, block_k: int, block_q: int, block_kv: int):
    """The span kernel over segments ``cu`` with explicit tiles (plan built once, as a layer stack would)."""
    from d3ds2.kernels.span_attention import span_attention
    from d3ds2.kernels.span_plan import plan_spans

    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff()).int()
    plan = plan_spans(seg.view(-1, 1, 1), cu, block_m, query_offsets=cu, check_unique=False)
    return lambda qq, kk, vv: span_attention(qq, kk, vv, plan, block_k=block_k, block_q=block_q, block_kv=block_kv)[0]


def attention_microbench(device, n: int = 10655, b: int = 3) -> list[dict]:
    """Self-attention of the SS-DiT (32 q heads, 2 KV heads, head dim 32, bf16) on b samples of n tokens:
    varlen flash (the model's path), the span kernel (default and other tiles) and dense SDPA backends on
    [b, 32, n, 32] (KV heads expanded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(b * n, 32, 32, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b * n, 2, 32, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(b * n, 2, 32, device=device, dtype=torch.bfloat16, generator=gen)
    do = torch.randn_like(q)
    cu = torch.arange(b + 1, device=device, dtype=torch.int32) * n
    fwd_flops = 4.0 * b * n * n * 1024
    results = []

    def dense(t):
        return t.view(b, n, t.shape[1], 32).transpose(1, 2).repeat_interleave(32 // t.shape[1], dim=1)

    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention(*qkv, cu, cu, n, n)
    ref_grads = [g.float() for g in torch.autograd.grad(ref, qkv, do)]
    ref = ref.detach().float()
    variants = {"varlen flash (model)": (lambda qq, kk, vv: varlen_attention(qq, kk, vv, cu, cu, n, n), None, False)}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        variants[f"{name} (dense, kv expanded)"] = (
            lambda qq, kk, vv: F.scaled_dot_product_attention(dense(qq), dense(kk), dense(vv)).transpose(1, 2).reshape(b * n, 32, 32),
            backend, False)
    variants["span kernel (ours, varlen_attention kernel='span')"] = (
        lambda qq, kk, vv: varlen_attention(qq, kk, vv, cu, cu, n, n, kernel="span"), None, False)
    for bm, bk, bq, bkv in SPAN_TILES:
        variants[f"span kernel, {bm * 16}-row tiles, {bk} keys; dK/dV {bq * 16} rows x {bkv} keys"] = (
            span_variant(cu, bm, bk, bq, bkv), None, False)
    variants["cudnn varlen forward (aten op, kv expanded)"] = (
        lambda qq, kk, vv: torch.ops.aten._cudnn_attention_forward(
            qq, kk.repeat_interleave(16, 1), vv.repeat_interleave(16, 1), None, cu, cu, n, n, False)[0], None, True)
    for name, (fn, backend, fwd_only) in variants.items():
        row = {"variant": name}
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                qq, kk, vv = (t.detach().requires_grad_(not fwd_only) for t in (q, k, v))
                out = fn(qq, kk, vv)
                row["rel_err_vs_varlen"] = ((out.float() - ref).norm() / ref.norm()).item()
                if not fwd_only:
                    grads = torch.autograd.grad(out, (qq, kk, vv), do)
                    row["grad_rel_err_vs_varlen"] = max(((g.float() - r).norm() / r.norm()).item()
                                                        for g, r in zip(grads, ref_grads))
                fwd = median_ms(lambda: fn(qq, kk, vv), warmup=50, iters=200)
                row.update(fwd_ms=fwd, fwd_tflops=fwd_flops / fwd / 1e9)
                if not fwd_only:
                    def fwd_bwd():
                        fn(qq, kk, vv).backward(do)

                    both = median_ms(fwd_bwd, warmup=50, iters=300, grad_to_none=[qq, kk, vv])
                    row.update(fwd_bwd_ms=both, fwd_bwd_tflops_counted_3x=3 * fwd_flops / both / 1e9,
                               fwd_bwd_tflops_actual_3_5x=3.5 * fwd_flops / both / 1e9)
        except Exception as e:
            row["error"] = repr(e)[:300]
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def profile_step(model, n: int, device, path: str | None, top: int = 15) -> dict:
    """CUDA time of one step by kernel group (torch.profiler), the ``top`` longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    x, cond, t, target = make_batch(n, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the AdamW step is timed in the rows
    train_step(model, opt, x, cond, t, target)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, x, cond, t, target)
        torch.cuda.synchronize(device)
    per_kernel: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc = per_kernel.setdefault(e.name, [0.0, 0])
            acc[0] += e.time_range.elapsed_us()
            acc[1] += 1
    groups: dict[str, float] = {}
    kernels = []
    for key, (us, count) in per_kernel.items():
        name = key.lower()
        if "flash" in name and "bwd" in name:
            g = "flash attention backward"
        elif "flash" in name:
            g = "flash attention forward"
        elif any(s in name for s in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90")):
            g = "GEMM (cuBLAS)"
        elif "memcpy" in name or "memset" in name:
            g = "memcpy / memset"
        elif "_mod_ln" in name or "_gated_res" in name:
            g = "modulation kernels (ours)"
        elif "span" in name or "topk" in name or "score" in name:
            g = "span / SSA kernels (ours)"
        elif "adam" in name or "multi_tensor" in name:
            g = "optimizer"
        elif "elementwise" in name or "vectorized" in name or "unrolled" in name or "reduce" in name:
            g = "other elementwise / reductions"
        else:
            g = "other"
        groups[g] = groups.get(g, 0.0) + us / 1e3
        kernels.append((us / 1e3, key[:120], count))
    kernels.sort(reverse=True)
    res = {"tokens": n, "batch": x.batch_size, "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
           "total_ms": sum(groups.values()),
           "top_kernels": [{"ms": ms, "name": k, "calls": c} for ms, k, c in kernels[:top]]}
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    del x, cond, t, target, opt
    torch.cuda.empty_cache()
    return res


def build(mode: str, device):
    """The v1.1 model (random init on the GPU) and its fused AdamW. mode: 'ssa' | 'full', with '-span' appended:
    the varlen attentions (cross, and self in 'full') through the span kernel instead of FlashAttention."""
    torch.manual_seed(0)
    attention, _, kernel = mode.partition("-")
    with torch.device(device):
        model = SparseDiT(attention=attention, ssa=SSA_V11 if attention == "ssa" else None,
                          attention_kernel=kernel or "auto")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def step_table(results: list[dict]) -> str:
    """The rows as a markdown table (errors and out-of-memory rows say so)."""
    rows = []
    for r in results:
        head = [f"{r['tokens']:,}", r["batch"], r["mode"], "yes" if r["ckpt"] else "no"]
        if "step_ms" in r:
            rows.append(head + [f"{r['step_ms']:,.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.0f}",
                                f"{100 * r['mfu']:.1f} %", f"{r['peak_gib']:.1f}"])
        else:
            rows.append(head + ["out of memory" if r.get("oom") else r.get("error", "-")[:80], "", "", "", ""])
    return markdown_table(["tokens/sample", "batch", "attention", "grad ckpt", "step ms", "tokens/s",
                           "counted TFLOP/s", "MFU", "peak GiB"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for dit_step.json and dit_step.md")
    ap.add_argument("--tokens", default=",".join(map(str, TABLE1)))
    ap.add_argument("--modes", default="full,ssa")
    ap.add_argument("--profile-out", default=None, help="also profile one step of the first mode at 10,655 tokens")
    ap.add_argument("--profile-top", type=int, default=15, help="kernels listed in the profile, longest first")
    ap.add_argument("--compile-row", action="store_true", help="one extra row: full, 10,655, blocks torch.compile'd")
    ap.add_argument("--online-forward-row", action="store_true",
                    help="per '-span' mode and token count, one more row with the online-softmax span forward")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds after which optional parts are skipped")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "flash_varlen": varlen_module._flash_varlen is not None, "flash_native_gqa": varlen_module._FLASH_GQA}
    print(json.dumps(info), flush=True)
    report = dict(info, checks=[], attention=[], results=[])

    def save():
        write_outputs(args.out, "dit_step", step_table(report["results"]), report)

    for check in (check_model, check_modulation):  # recorded; a failure is reported, the timings still run
        try:
            report["checks"].append(check(device))
        except Exception as e:
            report["checks"].append(f"CHECK FAILED {check.__name__}: {e!r}"[:600])
        print(report["checks"][-1], flush=True)
    report["attention"] = attention_microbench(device)
    save()
    modes = args.modes.split(",")
    for mode in modes:  # full first: the rows of the MFU target come before the rest
        model, opt = build(mode, device)
        for n in map(int, args.tokens.split(",")):
            rows = [(mode, False), (mode, True)]
            if args.online_forward_row and mode.endswith("span"):
                rows.append((mode + " (online-softmax forward)", False))
            min_keys = span_forward.BOUNDED_MIN_KEYS
            for label, ckpt in rows:
                if "online" in label:  # the bounded forward off: no span is long enough for it
                    span_forward.BOUNDED_MIN_KEYS = 2 ** 31
                r = bench_row(model, opt, label, ckpt, n, device)
                span_forward.BOUNDED_MIN_KEYS = min_keys
                r["elapsed_s"] = time.perf_counter() - t0
                print(json.dumps(r), flush=True)
                report["results"].append(r)
                save()
        if mode == modes[0] and args.profile_out:
            model.use_checkpoint = False
            try:
                report["profile"] = profile_step(model, 10655, device, args.profile_out, args.profile_top)
                print(json.dumps(report["profile"]["groups_ms"]), flush=True)
            except Exception as e:
                report["profile"] = {"error": repr(e)[:400]}
            save()
        del model, opt
        torch.cuda.empty_cache()
    if args.compile_row:  # last: its compilation time must not cost the other rows
        if time.perf_counter() - t0 > args.time_budget:
            report["compile"] = {"skipped": "time budget"}
        else:
            model, opt = build("full", device)
            for block in model.blocks:
                block.compile()
            start = time.perf_counter()
            report["compile"] = bench_row(model, opt, "full+compile", False, 10655, device)
            report["compile"]["compile_and_run_s"] = time.perf_counter() - start
        print(json.dumps(report["compile"]), flush=True)
        save()
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
