"""Benchmark of Spatial Sparse Attention (SSA) against dense FlashAttention-2 (torch SDPA) on a GPU.

Tokens = voxels of a noisy sphere shell (about 70 tokens per occupied 8^3 block); 32 q heads, 2 KV heads,
head dim 32, bf16. Times: medians after warm-up (benchmarks/harness.py); the dense baseline is timed in the same
run. Writes OUT/ssa.md and OUT/ssa.json.

    python benchmarks/ssa.py --out OUT [--sizes 16384 32768 65536 131072] [--batches 1 4]
                             [--configs v1.1 v1.0@1024] [--quick]
"""
from __future__ import annotations

import argparse
import math
import time
import traceback

import torch
import torch.nn.functional as F
from harness import median_ms, write_outputs

from d3ds2.attention.ssa import (SSAConfig, block_mean, build_ssa_layout, compressed_attention, select_blocks,
                                 selection_attention, selection_plan, spatial_sparse_attention,
                                 ssa_window_attention)
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.span_plan import _build_pairs, _tile_unions, default_block_m, plan_spans
from d3ds2.kernels import ssa_topk
from d3ds2.kernels.ssa_topk import score_topk

HQ, HKV, D = 32, 2, 32
CONFIGS = {
    "v1.1 (cmp 8, slc 8, top-8)": SSAConfig(m_cmp=8, m_slc=8, m_win=8, topk=8),
    "v1.0@1024 (cmp 4, slc 8, top-8)": SSAConfig(m_cmp=4, m_slc=8, m_win=8, topk=8),
    "v1.0@512 (cmp 4, slc 8, top-32)": SSAConfig(m_cmp=4, m_slc=8, m_win=8, topk=32),
    "v1.1 shared top-k": SSAConfig(m_cmp=8, m_slc=8, m_win=8, topk=8, shared_topk=True),
    "v1.1 window shift 4": SSAConfig(m_cmp=8, m_slc=8, m_win=8, topk=8, window_shift=4),
}


def shell_coords(n_target: int, batch: int = 0, seed: int = 0) -> torch.Tensor:
    """[N, 4] int32 voxels of a noisy sphere shell (thickness ~1.6 voxels) with about n_target voxels."""
    radius = math.sqrt(n_target / (4 * math.pi * 1.6))
    res = int(2 * radius * 1.15) + 4
    g = torch.arange(res, dtype=torch.float32) - res / 2 + 0.5
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    r = (x * x + y * y + z * z).sqrt().clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    a, b, c = (torch.rand(3, generator=gen) * 2 * math.pi).tolist()
    bump = 0.04 * radius * (torch.sin(3 * x / r + a) * torch.sin(2 * y / r + b) + torch.sin(4 * z / r + c))
    xyz = torch.nonzero(((r + bump) - radius).abs() < 0.8).int()
    return torch.cat([torch.full_like(xyz[:, :1], batch), xyz], 1)


DEV = "cuda"


def bench(fn, warmup=25, rep=100) -> float:
    if DEV == "cpu":  # --dry-run: one call, wall clock
        return median_ms(fn, warmup=0, iters=1)
    return median_ms(fn, warmup=warmup, iters=rep)


def bench_few(fn, reps=3) -> float:
    """Median of ``reps`` timed calls after one warm-up (for calls of a second: dense attention at large N)."""
    return bench(fn) if DEV == "cpu" else median_ms(fn, warmup=1, iters=reps)


def peak_gib(fn) -> tuple[float, float]:
    """(peak allocated GiB during fn, GiB already allocated before it: the inputs)."""
    if DEV == "cpu":
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30, base / 2**30


def smooth_features(coords, channels, gen, wavelength=24.0):
    """[N, channels] spatially smooth random features (random Fourier features of the coords), unit scale.

    Trained q/k vary smoothly in space; pure noise would make every compressed key the same mean and
    the block scores flat, which no real layer produces.
    """
    dev = coords.device
    w = torch.randn(3, 64, device=dev, generator=gen) * (2 * math.pi / wavelength)
    b = torch.rand(64, device=dev, generator=gen) * 2 * math.pi
    f = torch.sin(coords[:, 1:].float() @ w + b) * math.sqrt(2.0)
    return f @ (torch.randn(64, channels, device=dev, generator=gen) / 8.0)


class Inputs:
    """q/k/v/gates and v1 compression parameters on the GPU, in layout order. q and k = smooth
    spatial features + 0.3 noise; v = noise."""

    def __init__(self, coords, cfg: SSAConfig, dtype=None, seed=0):
        dtype = dtype or (torch.bfloat16 if DEV == "cuda" else torch.float32)
        dev = DEV
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.layout = build_ssa_layout(coords.to(dev), cfg.m_cmp, cfg.m_slc)
        n = self.layout.num_tokens
        self.n = n
        mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen).requires_grad_()
        c = self.layout.coords
        smooth = lambda h: (smooth_features(c, h * D, gen) + 0.3 * torch.randn(n, h * D, device=dev, generator=gen)
                            ).view(n, h, D).to(dtype).requires_grad_()
        self.q, self.k, self.v = smooth(HQ), smooth(HKV), mk(n, HKV, D)
        self.gates = torch.rand(n, 3, device=dev, dtype=dtype, generator=gen).requires_grad_()
        c = HKV * D
        self.wk, self.wv = ((torch.randn(c, c, device=dev, dtype=dtype, generator=gen) / c**0.5).requires_grad_()
                            for _ in range(2))
        self.bk, self.bv = mk(c), mk(c)
        self.pe = (torch.randn(cfg.m_cmp ** 3, c, device=dev, dtype=dtype, generator=gen) * 0.1).requires_grad_()
        self.leaves = [self.q, self.k, self.v, self.gates, self.wk, self.wv, self.bk, self.bv, self.pe]

    def compress(self):
        lay, n = self.layout, self.n
        k = self.k.reshape(n, -1) + self.pe[lay.pe_index]
        kc = block_mean(F.silu(F.linear(k, self.wk, self.bk)), lay).view(-1, HKV, D)
        vc = block_mean(F.silu(F.linear(self.v.reshape(n, -1), self.wv, self.bv)), lay).view(-1, HKV, D)
        return kc, vc

    def ssa(self, cfg):
        kc, vc = self.compress()
        return spatial_sparse_attention(self.q, self.k, self.v, kc, vc, self.gates, self.layout, cfg)


def fwd_bwd(fn, leaves):
    def run():
        out = fn()
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return run


def dense_flash(coords_list_sizes, dtype=None):
    """Dense FlashAttention-2 (SDPA flash backend, K/V repeated to 32 heads): per sample, summed. (fwd, fwd+bwd) ms."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = dtype or (torch.bfloat16 if DEV == "cuda" else torch.float32)
    fwd = fb = 0.0
    backend = SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH
    for n in coords_list_sizes:
        q = torch.randn(1, HQ, n, D, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(1, HKV, n, D, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(1, HKV, n, D, device=DEV, dtype=dtype, requires_grad=True)

        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(HQ // HKV, 1),
                                                      v.repeat_interleave(HQ // HKV, 1))
        fwd += bench_few(f)
        fb += bench_few(fwd_bwd(f, [q, k, v]))
    return fwd, fb


def selection_flops(idx, layout) -> float:
    """4 * D * (keys attended, summed over queries and q heads) for the selection branch."""
    lens = (layout.block_offsets[1:] - layout.block_offsets[:-1]).long()
    keys = torch.where(idx >= 0, lens[idx.long().clamp(min=0)], 0).sum().item()  # over (query, kv head)
    return 4.0 * D * keys * (HQ // HKV)


def nearest_block_idx(layout, topk):
    """Anchor-style selection: every token of a block selects the top-k nearest blocks of its sample."""
    bo = layout.block_offsets.long()
    bc = layout.coords[bo[:-1]].float()
    bc = torch.cat([bc[:, :1] * 1e6, torch.div(bc[:, 1:], layout.m_slc, rounding_mode="floor")], 1)
    d = torch.cdist(bc, bc)
    nb = d.topk(min(topk, d.shape[0]), largest=False).indices.int()
    return nb[layout.block_of_token.long()].unsqueeze(1).expand(-1, HKV, -1).contiguous()


def bench_config(n_target, n, batch, name, cfg, coords, flash_f, flash_fb, args, rows_whole, rows_branch, rows_sel,
                 rows_agree):
    inp = Inputs(coords, cfg)
    lay = inp.layout
    tpb = n / (lay.block_offsets.numel() - 1)
    f = lambda: inp.ssa(cfg)
    t_f = bench(f)
    t_fb = bench(fwd_bwd(f, inp.leaves))
    mem, base = peak_gib(fwd_bwd(f, inp.leaves))
    mem_f, _ = peak_gib(f)
    rows_whole.append((n, batch, name, t_f, t_fb, flash_f, flash_fb, flash_f / t_f, flash_fb / t_fb,
                       mem, tpb, lay.cmp_counts.numel(), base, mem_f))
    print(rows_whole[-1], flush=True)
    if batch == 1 and n_target == max(args.sizes):
        kc, vc = inp.compress()
        kc_d, vc_d = kc.detach().requires_grad_(), vc.detach().requires_grad_()
        o_c, lse = compressed_attention(inp.q, kc_d, vc_d, lay)
        idx = select_blocks(inp.q.detach(), kc.detach(), lse, lay, cfg.topk, cfg.shared_topk)
        def score_args(**kw):
            return score_topk(inp.q.detach(), kc.detach(), lse, lay.sample_of_token, lay.sample_block_offsets,
                              lay.block_of_cmp, cfg.topk, chunks=lay.score_chunks(), **kw)[0]

        if not cfg.shared_topk:  # the tile shapes must agree (up to near-ties) before their times mean anything
            same = lambda a, b: (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
            rows_agree.append((name, "top-k 8 vs 4 queries/tile", same(idx, score_args(block_m=4))))
            print("top-k agreement 8 vs 4 queries/tile:", rows_agree[-1], flush=True)
        idx32, bm = idx.to(torch.int32).contiguous(), default_block_m(HQ // HKV, cfg.topk)
        want = _tile_unions(idx32, bm)  # the plan variants must agree exactly before their times mean anything
        plan = selection_plan(idx, lay, HQ // HKV)
        got = (plan.union, plan.union_count, plan.union_full)
        rows_agree.append((name, "tile unions, Triton of selection_plan == PyTorch",
                           float(all(torch.equal(a, b) for a, b in zip(got, want)))))
        print(rows_agree[-1], flush=True)
        br = {
            "compression (v1, PE, mean)": (lambda: inp.compress()[0] + inp.compress()[1], inp.leaves),
            "compressed attention": (lambda: compressed_attention(inp.q, kc_d, vc_d, lay)[0],
                                     [inp.q, kc_d, vc_d]),
            "block scoring + top-k": (lambda: select_blocks(inp.q.detach(), kc.detach(), lse, lay,
                                                            cfg.topk, cfg.shared_topk), None),
            **({} if cfg.shared_topk else {
                "block scoring + top-k (4 queries/tile)": (lambda: score_args(block_m=4), None)}),
            "selection plan (Triton tile unions, as the SSA forward builds it; part of selection attention)": (
                lambda: selection_plan(idx, lay, HQ // HKV).union, None),
            "tile unions, PyTorch (the previous plan)": (lambda: _tile_unions(idx32, bm)[0], None),
            "plan with the duplicate check (public API default; host sync)": (
                lambda: plan_spans(idx, lay.block_offsets, bm).union, None),
            "pair CSR of the backward (sort + searchsorted)": (
                lambda: _build_pairs(idx32, lay.block_offsets.numel() - 1)[0], None),
            "selection attention": (lambda: selection_attention(inp.q, inp.k, inp.v, idx, lay),
                                    [inp.q, inp.k, inp.v]),
            "window attention": (lambda: ssa_window_attention(inp.q, inp.k, inp.v, lay, cfg.m_win,
                                                              cfg.window_shift),
                                 [inp.q, inp.k, inp.v]),
        }
        for bname, (fn, leaves) in br.items():
            try:
                tf = bench(fn)
                tfb = bench(fwd_bwd(fn, leaves)) if leaves else float("nan")
            except Exception:  # report the failure, keep the other rows
                traceback.print_exc()
                continue
            rows_branch.append((n, name, bname, tf, tfb))
            print(rows_branch[-1], flush=True)
        fl = selection_flops(idx, lay)
        t_sel = [r for r in rows_branch if r[1] == name and r[2] == "selection attention"][-1]
        rows_sel.append((n, name + " (scored top-k)", fl / n / HQ / D / 4, t_sel[3], t_sel[4],
                         fl / t_sel[3] / 1e9))


def run_sizes(args, report):
    rows_whole, rows_branch, rows_sel, rows_agree = [], [], [], []
    configs = {name: cfg for name, cfg in CONFIGS.items()
               if not args.configs or any(name.startswith(c) for c in args.configs)}
    for n_target in args.sizes:
        for batch in args.batches:
            if batch == 1:
                coords = shell_coords(n_target)
            else:
                fracs = [0.1, 0.2, 0.3, 0.4]
                coords = torch.cat([shell_coords(int(n_target * f), b, seed=b) for b, f in enumerate(fracs)])
            sizes = torch.bincount(coords[:, 0].long()).tolist()
            n = len(coords)
            flash_f, flash_fb = dense_flash(sizes)
            for name, cfg in configs.items():
                extra = any(w in name for w in ("shared", "top-32", "v1.0", "shift"))
                if args.quick and extra and batch == 4:
                    continue
                try:
                    bench_config(n_target, n, batch, name, cfg, coords, flash_f, flash_fb, args, rows_whole,
                                 rows_branch, rows_sel, rows_agree)
                except Exception:  # report the failure, keep the other rows
                    traceback.print_exc()
                if DEV == "cuda":
                    torch.cuda.empty_cache()
            if batch == 1:
                # anchor-style selection: nearest blocks shared by the tokens of a block
                inp = Inputs(coords, CONFIGS["v1.1 (cmp 8, slc 8, top-8)"])
                for topk in (8, 16):
                    idx = nearest_block_idx(inp.layout, topk)
                    fn = lambda: selection_attention(inp.q, inp.k, inp.v, idx, inp.layout)
                    tf = bench(fn)
                    tfb = bench(fwd_bwd(fn, [inp.q, inp.k, inp.v]))
                    fl = selection_flops(idx, inp.layout)
                    rows_sel.append((n, f"nearest top-{topk}", fl / n / HQ / D / 4, tf, tfb, fl / tf / 1e9))
                    print(rows_sel[-1], flush=True)
                del inp
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    report.append("### Whole SSA attention (q/k/v + v1 compression params + gates -> gated output) vs dense flash\n")
    report.append("| N | batch | config | SSA fwd ms | SSA fwd+bwd ms | flash fwd ms | flash fwd+bwd ms | "
                  "speed-up fwd | speed-up fwd+bwd | peak GiB (fwd+bwd) | inputs GiB | peak GiB (fwd) | "
                  "tokens/8³ block | N_cmp |")
    report.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_whole:
        report.append(f"| {r[0]:,} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} | "
                      f"{r[7]:.1f}x | {r[8]:.1f}x | {r[9]:.2f} | {r[12]:.2f} | {r[13]:.2f} | {r[10]:.0f} | {r[11]:,} |")
    report.append("\n### Branches at the largest N, batch 1 (ms)\n")
    report.append("| N | config | branch | fwd ms | fwd+bwd ms |")
    report.append("|---|---|---|---|---|")
    for r in rows_branch:
        report.append(f"| {r[0]:,} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} |")
    report.append("\n### Agreement checks at the largest N (top-k tile shapes: fraction of (query, KV head) "
                  "with the same blocks; plan variants: 1 = identical)\n")
    report.append("| config | check | agreement |")
    report.append("|---|---|---|")
    for r in rows_agree:
        report.append(f"| {r[0]} | {r[1]} | {r[2]:.4f} |")
    report.append("\n### Selection branch alone\n")
    report.append("| N | selection | keys/query | fwd ms | fwd+bwd ms | effective fwd TFLOP/s |")
    report.append("|---|---|---|---|---|---|")
    for r in rows_sel:
        report.append(f"| {r[0]:,} | {r[1]} | {r[2]:.0f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.0f} |")


def tune(args, report):
    """Time the span-attention kernels with several tile shapes at the largest N (v1.1 top-k 8)."""
    coords = shell_coords(max(args.sizes))
    cfg = CONFIGS["v1.1 (cmp 8, slc 8, top-8)"]
    inp = Inputs(coords, cfg)
    lay = inp.layout
    kc, vc = (t.detach().requires_grad_() for t in inp.compress())
    o_c, lse = compressed_attention(inp.q, kc, vc, lay)
    idx = select_blocks(inp.q.detach(), kc.detach(), lse, lay, cfg.topk)
    near = nearest_block_idx(lay, 8)
    report.append("\n### Tile shapes (N = %d): fwd / fwd+bwd ms\n" % inp.n)
    report.append("| op | block_m (queries) | block_k | block_q | fwd ms | fwd+bwd ms |")
    report.append("|---|---|---|---|---|---|")
    g = HQ // HKV
    cases = []
    for bk in (32, 64):
        for bq in (2, 4, 8):
            cases.append(("selection (scored)", idx, lay.block_offsets, None, 4, bk, bq, inp.k, inp.v))
            cases.append(("selection (nearest)", near, lay.block_offsets, None, 4, bk, bq, inp.k, inp.v))
    for bk in (32, 64):
        for bq in (4, 8):
            cases.append(("window", lay.block_of_token.view(-1, 1, 1), lay.block_offsets, lay.block_offsets, 4,
                          bk, bq, inp.k, inp.v))
    def scored(bm, warps):
        return score_topk(inp.q, kc, lse, lay.sample_of_token, lay.sample_block_offsets, lay.block_of_cmp, 8,
                          block_m=bm, num_warps=warps)[0].sort(-1).values

    ref = scored(None, None)  # the default tile; the others must pick the same blocks (up to near-ties)
    for bm, warps in ((4, 4), (8, 4), (8, 8), (16, 4), (16, 8)):
        try:
            same = (scored(bm, warps) == ref).all(-1).float().mean().item()
            t = bench(lambda: scored(bm, warps))
        except Exception as e:  # a shape the compiler rejects (registers, shared memory)
            print("score", bm, warps, "failed:", str(e)[:200], flush=True)
            continue
        report.append(f"| score + top-k, {warps} warps (agreement with the default {same:.4f}) | {bm} ({bm * g} rows) "
                      f"| - | - | {t:.3f} | - |")
        print(report[-1], flush=True)
    for bk in (64, 128):
        for bq in (4, 8):
            cases.append(("compressed", lay.sample_of_token.view(-1, 1, 1), lay.sample_cmp_offsets,
                          lay.sample_token_offsets, 4, bk, bq, kc, vc))
    for name, ix, soff, qoff, bm, bk, bq, k, v in cases:
        plan = plan_spans(ix, soff, bm, query_offsets=qoff)
        fn = lambda: span_attention(inp.q, k, v, plan, block_k=bk, block_q=bq)[0]
        try:
            tf = bench(fn)
            tfb = bench(fwd_bwd(fn, [inp.q, k, v]))
        except Exception as e:  # a shape the compiler rejects (e.g. shared memory)
            print(name, bm, bk, "failed:", str(e)[:200], flush=True)
            continue
        report.append(f"| {name} | {bm} ({bm * g} rows) | {bk} | {bq} | {tf:.3f} | {tfb:.3f} |")
        print(report[-1], flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="1 = one shell, 4 = four of mixed sizes")
    p.add_argument("--configs", nargs="*", default=None, help="config name prefixes (default: all)")
    p.add_argument("--out", default=".", help="folder for ssa.md and ssa.json")
    p.add_argument("--quick", action="store_true", help="batch 4: only the v1.1 configs")
    p.add_argument("--tune", action="store_true", help="only time kernel tile shapes at the largest size")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run (TRITON_INTERPRET=1) to check the script")
    p.add_argument("--score-tile", default=None, metavar="ROWSxWARPS",
                   help="default tile of the scoring kernel in this process (d3ds2.kernels.ssa_topk.SCORE_ROWS / SCORE_WARPS)")
    args = p.parse_args()
    if args.score_tile:
        ssa_topk.SCORE_ROWS, ssa_topk.SCORE_WARPS = map(int, args.score_tile.split("x"))
    global DEV
    if args.dry_run:
        DEV = "cpu"
        args.sizes = [600]
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/ssa.py needs a CUDA GPU")
    report = [f"{HQ} q heads, {HKV} KV heads, head dim {D}, bf16; scoring tile {ssa_topk.SCORE_ROWS} rows x "
              f"{ssa_topk.SCORE_WARPS} warps.\n"]
    t0 = time.time()
    if args.tune:
        tune(args, report)
    else:
        run_sizes(args, report)
    report.append(f"\n(total benchmark time {time.time() - t0:.0f} s)")
    print(write_outputs(args.out, "ssa", "\n".join(report), {"report": report}))


if __name__ == "__main__":
    main()
