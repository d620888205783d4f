"""Where the attention kernels stand against the GPU's own rates, per attention score (GPU).

Three measurements in one process:
1. *SFU rate*: the exp2 probe of ``span_forward_ablation.py``.
2. *Overlap probe* (Gluon): each of 4 programs per multiprocessor issues an asynchronous wgmma chain at one of
   the span kernels' shapes (m64 x N x K: scores 64 x 64 x 32, P @ V 64 x 32 x 64), A from registers (RS, as
   the kernels do) or from shared memory (SS), then WORK rounds of independent ALU work on 16 registers per
   thread (an FFMA each, or an exp2 and an FMUL), then waits for the wgmma. Timing each part alone and both
   together shows whether the multiprocessor runs tensor-core and ALU / SFU work at the same time: if it
   does, both together take the longer of the two; if not, their sum.
3. *Attention kernels at head dims 32, 64 and 128* on the same problem as the SS-DiT's self-attention
   (3 samples x 10,655 tokens, model width 1,024 = heads x head dim, bf16): torch's FlashAttention-2 and cuDNN
   (dense SDPA, one KV head per q head) and the project's span kernel (2 KV heads, as in the model). Per kernel:
   forward and forward+backward ms, TFLOP/s (4 N^2 d per head forward, x3 forward+backward, as the MFU counts
   them), attention scores per second, and the share of the SFU's exp2 rate the kernel runs at (exps per score:
   1 forward; forward+backward 2 for FlashAttention/cuDNN, which recompute P once, 3 for the span kernel,
   whose dQ and dK/dV passes each recompute it).
Checks first: the probe's matmul against torch; each library kernel's output against the span kernel's.
Usage: python benchmarks/attention_bounds.py --out bounds.json
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F
import triton

import d3ds2.kernels.span_attention as sa
from span_forward_ablation import exp2_rate

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older triton without Gluon
    gluon = None

TOKENS, BATCH, WIDTH = 10655, 3, 1024
PROBE_SHAPES = [(64, 32), (32, 64)]  # (K, N) of the m64 x N x K wgmma: P @ V, scores
PROBE_WORK = [(0, False), (8, False), (16, False), (1, True), (2, True)]  # (rounds, exp2) of ALU work per wgmma
PROBE_ITERATIONS, PROBE_PROGRAMS_PER_SM = 512, 4
MMA_NONE, MMA_RS, MMA_SS = 0, 1, 2

if gluon is not None:
    @gluon.jit
    def _overlap_probe(A, B, X, C, Y, N_ITER: gl.constexpr, K: gl.constexpr, N: gl.constexpr, MMA: gl.constexpr,
                       WORK: gl.constexpr, EXP: gl.constexpr):
        """N_ITER times: wgmma acc += A [64, K] @ B [K, N] (MMA: none / RS / SS, asynchronous), WORK rounds of
        x = x * 0.999 + 0.001 (or x = exp2(x) * -0.5 with EXP) on x [64, 32] fp32, then wait for the wgmma.
        Writes acc to C [programs, 64, N] and x to Y [programs, 64, 32]."""
        ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_L, k_width=2)
        LA: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (K // 8), K // 8], [4, 1], [1, 0])
        LB: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (N // 8), N // 8], [4, 1], [1, 0])
        XL: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])
        m = gl.arange(0, 64, gl.SliceLayout(1, LA))
        ka = gl.arange(0, K, gl.SliceLayout(0, LA))
        a = gl.load(A + m[:, None] * K + ka[None, :])
        kb = gl.arange(0, K, gl.SliceLayout(1, LB))
        nb = gl.arange(0, N, gl.SliceLayout(0, LB))
        b = gl.load(B + kb[:, None] * N + nb[None, :])
        a_s = gl.allocate_shared_memory(A.dtype.element_ty, [64, K],
                                        gl.NVMMASharedLayout.get_default_for([64, K], A.dtype.element_ty), a)
        b_s = gl.allocate_shared_memory(B.dtype.element_ty, [K, N],
                                        gl.NVMMASharedLayout.get_default_for([K, N], B.dtype.element_ty), b)
        fence_async_shared()
        a_r = gl.convert_layout(a, A_L)
        xr = gl.arange(0, 64, gl.SliceLayout(1, XL))
        xc = gl.arange(0, 32, gl.SliceLayout(0, XL))
        x = gl.load(X + xr[:, None] * 32 + xc[None, :])
        acc = gl.zeros([64, N], gl.float32, ACC_L)
        for _ in range(N_ITER):
            if MMA == 1:
                acc = warpgroup_mma(a_r, b_s, acc, is_async=True)
            if MMA == 2:
                acc = warpgroup_mma(a_s, b_s, acc, is_async=True)
            for _j in gl.static_range(WORK):
                if EXP:
                    x = gl.exp2(x) * -0.5
                else:
                    x = x * 0.999 + 0.001
            if MMA != 0:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        cm = gl.arange(0, 64, gl.SliceLayout(1, ACC_L))
        cn = gl.arange(0, N, gl.SliceLayout(0, ACC_L))
        gl.store(C + gl.program_id(0) * 64 * N + cm[:, None] * N + cn[None, :], acc)
        gl.store(Y + gl.program_id(0) * 64 * 32 + xr[:, None] * 32 + xc[None, :], x)


def overlap_rows(device) -> list[dict]:
    """Probe times (ms) for each shape, operand source and ALU work; see the module docstring."""
    programs = PROBE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for k, n in PROBE_SHAPES:
        a = (torch.randn(64, k, device=device) * 0.01).to(torch.bfloat16)
        b = (torch.randn(k, n, device=device) * 0.01).to(torch.bfloat16)
        x = torch.randn(64, 32, device=device) * 0.1
        c = torch.empty(programs, 64, n, device=device)
        y = torch.empty(programs, 64, 32, device=device)
        expected = PROBE_ITERATIONS * (a.float() @ b.float())
        for mma in (MMA_NONE, MMA_RS, MMA_SS):
            for work, exp in PROBE_WORK:
                if mma == MMA_NONE and work == 0:  # nothing to time
                    continue
                run = lambda: _overlap_probe[(programs,)](a, b, x, c, y, N_ITER=PROBE_ITERATIONS, K=k, N=n, MMA=mma,
                                                          WORK=work, EXP=exp, num_warps=4)
                run()
                row = {"shape": f"64x{n}x{k}", "mma": ["none", "RS", "SS"][mma],
                       "work": f"{work} x {'exp2' if exp else 'FFMA'}" if work else "none"}
                if mma != MMA_NONE:
                    row["rel_err"] = ((c[0] - expected).norm() / expected.norm()).item()
                row["ms"] = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
                if mma != MMA_NONE and work == 0:
                    row["tflops"] = 2 * 64 * k * n * PROBE_ITERATIONS * programs / row["ms"] / 1e9
                rows.append(row)
                print(json.dumps(row), flush=True)
    alone = {(r["shape"], r["mma"], r["work"]): r["ms"] for r in rows}
    for r in rows:  # both together against the sum and the longer of the parts
        if r["mma"] != "none" and r["work"] != "none":
            mma_ms, work_ms = alone[(r["shape"], r["mma"], "none")], alone[(r["shape"], "none", r["work"])]
            r.update(sum_of_parts_ms=mma_ms + work_ms, longer_part_ms=max(mma_ms, work_ms),
                     hidden_share_of_shorter=(mma_ms + work_ms - r["ms"]) / min(mma_ms, work_ms))
    return rows


def attention_rows(device, exp2_per_s: float) -> list[dict]:
    """Forward and forward+backward of each kernel at head dims 32 / 64 / 128 (see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(3)
    rows = []
    for d in (32, 64, 128):
        heads = WIDTH // d
        n_all = BATCH * TOKENS
        q, k, v, do = (torch.randn(n_all, heads, d, device=device, generator=gen).to(torch.bfloat16) for _ in range(4))
        k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()  # the model's 2 KV heads for the span kernel
        cu = torch.arange(BATCH + 1, device=device, dtype=torch.int32) * TOKENS
        sample = torch.repeat_interleave(torch.arange(BATCH, device=device), TOKENS).int().view(-1, 1, 1)
        plan = sa.plan_spans(sample, cu, sa.default_block_m(heads // 2, 1), query_offsets=cu, check_unique=False)
        dense = lambda t: t.view(BATCH, TOKENS, heads, d).transpose(1, 2)
        undense = lambda t: t.transpose(1, 2).reshape(n_all, heads, d)
        expand = lambda t: t.repeat_interleave(heads // 2, dim=1)  # 2 KV heads -> one per q head, for the checks
        # name: (attention, its K and V, exps per score forward + backward, SDPA backend)
        kernels = {"span kernel (ours, 2 KV heads)": (lambda qq, kk, vv: sa.span_attention(qq, kk, vv, plan)[0],
                                                      (k2, v2), 3, None)}
        for name, backend in (("FlashAttention-2 (SDPA)", SDPBackend.FLASH_ATTENTION),
                              ("cuDNN (SDPA)", SDPBackend.CUDNN_ATTENTION)):
            sdpa = lambda qq, kk, vv: undense(F.scaled_dot_product_attention(dense(qq), dense(kk), dense(vv)))
            kernels[name] = (sdpa, (k, v), 2, backend)
        scores = BATCH * heads * TOKENS ** 2
        flops = 4.0 * scores * d
        reference = None
        for name, (fn, (kk, vv), exps_per_score, backend) in kernels.items():
            row = {"kernel": name, "head_dim": d, "q_heads": heads, "kv_heads": kk.shape[1]}
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    leaves = [t.detach().requires_grad_() for t in (q, kk, vv)]
                    out = fn(*leaves)
                    if reference is None:  # the span kernel's output on the model's 2 KV heads
                        reference = {"o": out.detach().float(), "kv": (expand(kk), expand(vv))}
                    else:  # the same attention with the KV heads expanded, through this kernel
                        o2 = fn(q, *reference["kv"]).float()
                        row["rel_err_vs_span"] = ((o2 - reference["o"]).norm() / reference["o"].norm()).item()
                    fwd = triton.testing.do_bench(lambda: fn(*leaves), warmup=25, rep=200, return_mode="median")

                    def fwd_bwd():
                        fn(*leaves).backward(do)
                    both = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, grad_to_none=leaves,
                                                   return_mode="median")
                row.update(fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                           fwd_bwd_tflops=3 * flops / both / 1e9, fwd_scores_per_s=scores / fwd * 1e3,
                           fwd_of_exp_rate=scores / (fwd * 1e-3) / exp2_per_s,
                           fwd_bwd_of_exp_rate=exps_per_score * scores / (both * 1e-3) / exp2_per_s)
            except Exception as e:  # recorded; the next kernel runs
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_bounds.json")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the per-clock exp2 rate")
    ap.add_argument("--skip-attention", action="store_true", help="only the SFU and overlap probes")
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "exp2": exp2_rate(device, args.clock_ghz)}
    print(json.dumps(result), flush=True)
    result["overlap"] = overlap_rows(device)
    if not args.skip_attention:
        result["attention"] = attention_rows(device, result["exp2"]["exp2_per_s"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
