"""Tile and warp sweep of the span-attention kernels at the SS-DiT's shapes (GPU).

Self-attention: 3 samples x 10,655 tokens, 32 q heads, 2 KV heads (G = 16), head dim 32, bf16. Cross-attention:
the same queries to 3 x 1,374 condition tokens, 32 heads each (G = 1). Per variant: the forward and
forward+backward medians (``triton.testing.do_bench``), the time of each kernel (torch.profiler, mean of 5
steps), and the largest relative L2 difference of o, dQ, dK, dV from the first variant on the same inputs,
whose output is also checked against the float64 reference on 256 queries. A variant sets the forward/dQ tile
(queries per tile, keys per step), the dK/dV tile (queries x keys) and, where given, the warps of those kernels
(the library derives them from the rows of a tile), a register cap of the forward/dQ kernels (ptxas ``maxnreg``: more
CTAs per multiprocessor, at the price of spills where the cap is below what the kernel needs), and which dK/dV
kernel runs on Hopper (the Gluon one by default, or the Triton one), the forward (bounded, the default, or online
softmax), an outlier key per sample whose norm makes the bounded forward redo every tile (its worst case), and
keys shifted along one direction (which the bound about the span's center absorbs).
Rows = queries x the q heads of a KV head.
Usage: python benchmarks/span_tiles.py --out tiles.json
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
import triton

import d3ds2.kernels.span_attention as sa

TOKENS, CONTEXT, BATCH = 10655, 1374, 3
KERNELS = ("_span_fwd_kernel", "_span_bwd_dq_kernel", "_span_bwd_dkdv_kernel")
KEY_BOUNDS_KERNEL = "_span_key_bounds_kernel"  # the bounded forward's per-span key bounds: timed, not wrapped
HOPPER_KERNEL = "_span_dkdv_hopper_kernel"  # the Gluon dK/dV kernel: timed, not wrapped


@dataclass
class Variant:
    """Tiles of one run; None = the library default."""

    label: str
    kind: str  # 'self' | 'cross'
    block_m: int | None = None  # queries per forward / dQ tile
    block_k: int = 64  # keys per forward / dQ step
    fwd_warps: int | None = None
    fwd_maxnreg: int | None = None  # register cap of the forward / dQ kernels (more CTAs per SM, maybe spills)
    block_q: int | None = None  # queries per dK/dV step
    block_kv: int = 64  # keys per dK/dV tile
    dkdv_warps: int | None = None
    hopper_dkdv: bool = True  # False: the Triton dK/dV kernel where the Gluon one would run
    bounded: bool = True  # False: the online-softmax forward (running max) instead of the bounded one
    outlier_key: float = 0.0  # > 0: the first key of each sample gets this norm (the bounded forward redoes tiles)
    key_offset: float = 0.0  # > 0: every key shifted by this norm along one direction (as a large k bias would)


VARIANTS = [
    Variant("default", "self"),
    Variant("Triton dK/dV kernel", "self", hopper_dkdv=False),
    Variant("fwd/dQ 128 rows, 8 warps", "self", block_m=8, fwd_warps=8),
    Variant("fwd/dQ 128 rows x 128 keys, 8 warps", "self", block_m=8, block_k=128, fwd_warps=8),
    Variant("fwd/dQ 256 rows, 8 warps", "self", block_m=16, fwd_warps=8),
    Variant("fwd/dQ 32 keys per step", "self", block_k=32),
    Variant("fwd/dQ 96 registers (5 CTAs per SM)", "self", fwd_maxnreg=96),
    Variant("fwd/dQ 80 registers (6 CTAs per SM)", "self", fwd_maxnreg=80),
    Variant("fwd/dQ 32 keys per step, 64 registers (8 CTAs per SM)", "self", block_k=32, fwd_maxnreg=64),
    Variant("fwd/dQ 128 rows, 4 warps (two m64 tiles per warpgroup)", "self", block_m=8, fwd_warps=4),
    Variant("dK/dV 64 rows x 64 keys", "self", block_q=4),
    Variant("dK/dV 32 rows x 64 keys", "self", block_q=2),
    Variant("dK/dV 128 rows x 128 keys, 8 warps", "self", block_q=8, block_kv=128, dkdv_warps=8),
    Variant("dK/dV 64 rows x 128 keys, 8 warps", "self", block_q=4, block_kv=128, dkdv_warps=8),
    Variant("dK/dV 128 rows x 32 keys (refused on sm_90)", "self", block_q=8, block_kv=32),
    Variant("online-softmax forward (running max)", "self", bounded=False),
    Variant("bounded forward, an outlier key of norm 1000 per sample", "self", outlier_key=1000.0),
    Variant("online-softmax forward, the same outlier keys", "self", bounded=False, outlier_key=1000.0),
    Variant("bounded forward, keys shifted by 30 along one direction", "self", key_offset=30.0),
    Variant("default", "cross"),
    Variant("online-softmax forward (running max)", "cross", bounded=False),
    Variant("Triton dK/dV kernel", "cross", hopper_dkdv=False),
    Variant("fwd/dQ 128 rows, 8 warps", "cross", block_m=128, fwd_warps=8),
    Variant("fwd/dQ 96 registers (5 CTAs per SM)", "cross", fwd_maxnreg=96),
    Variant("fwd/dQ 80 registers (6 CTAs per SM)", "cross", fwd_maxnreg=80),
    Variant("dK/dV 64 rows x 64 keys", "cross", block_q=64),
    Variant("dK/dV 128 rows x 128 keys, 8 warps", "cross", block_q=128, block_kv=128, dkdv_warps=8),
]


class _LaunchOptions:
    """A Triton kernel whose launches get ``options`` (e.g. num_warps) over the library's own."""

    def __init__(self, kernel, **options):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            return launch(*args, **{**kwargs, **self.options})
        return run


def problem(kind: str, device, outlier_key: float = 0.0, key_offset: float = 0.0):
    """(q, k, v, dO, query offsets, key offsets, sample of each query) of the self- or cross-attention;
    ``outlier_key`` > 0: the first key of each sample and KV head scaled to that norm; ``key_offset`` > 0:
    every key shifted by that norm along one random direction per KV head."""
    gen = torch.Generator(device=device).manual_seed(5)
    n_keys, heads_kv = (TOKENS, 2) if kind == "self" else (CONTEXT, 32)

    def randn(*shape):
        return torch.randn(shape, device=device, generator=gen).to(torch.bfloat16)
    q, do = randn(BATCH * TOKENS, 32, 32), randn(BATCH * TOKENS, 32, 32)
    k, v = randn(BATCH * n_keys, heads_kv, 32), randn(BATCH * n_keys, heads_kv, 32)
    cu_q = torch.arange(BATCH + 1, device=device, dtype=torch.int32) * TOKENS
    cu_k = torch.arange(BATCH + 1, device=device, dtype=torch.int32) * n_keys
    sample = torch.repeat_interleave(torch.arange(BATCH, device=device), TOKENS).int().view(-1, 1, 1)
    if outlier_key:
        first = cu_k[:-1].long()
        k[first] = (k[first].float() * outlier_key / k[first].float().norm(dim=-1, keepdim=True)).to(k.dtype)
    if key_offset:
        u = torch.randn(heads_kv, 32, device=device, generator=gen)
        k = (k.float() + key_offset * u / u.norm(dim=-1, keepdim=True)).to(k.dtype)
    return q, k, v, do, cu_q, cu_k, sample


def kernel_ms(fn, reps: int = 5) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name in KERNELS + (HOPPER_KERNEL, KEY_BOUNDS_KERNEL):
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / reps
    return {name: round(ms, 3) for name, ms in out.items()}


def run_variant(var: Variant, device, baseline: dict) -> dict:
    originals = {name: getattr(sa, name) for name in KERNELS + ("HOPPER_DKDV", "BOUNDED_FORWARD")}
    row = asdict(var)
    try:
        fwd_options = {key: value for key, value in (("num_warps", var.fwd_warps), ("maxnreg", var.fwd_maxnreg))
                       if value}
        if fwd_options:
            for name in KERNELS[:2]:
                setattr(sa, name, _LaunchOptions(originals[name], **fwd_options))
        if var.dkdv_warps:
            sa._span_bwd_dkdv_kernel = _LaunchOptions(originals[KERNELS[2]], num_warps=var.dkdv_warps)
        sa.HOPPER_DKDV = var.hopper_dkdv
        sa.BOUNDED_FORWARD = var.bounded
        q, k, v, do, cu_q, cu_k, sample = problem(var.kind, device, var.outlier_key, var.key_offset)
        group = q.shape[1] // k.shape[1]
        plan = sa.plan_spans(sample, cu_k, var.block_m or sa.default_block_m(group, 1), query_offsets=cu_q,
                             check_unique=False)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward():
            return sa.span_attention(*leaves, plan, backend="triton", block_k=var.block_k, block_q=var.block_q,
                                     block_kv=var.block_kv)[0]

        def forward_backward():
            forward().backward(do)
        out = forward()
        got = [out.float()] + [g.float() for g in torch.autograd.grad(out, leaves, do)]
        inputs = (var.kind, var.outlier_key, var.key_offset)  # variants on the same inputs: compared with the first
        if inputs not in baseline:
            baseline[inputs] = got
            sub = torch.arange(0, q.shape[0], q.shape[0] // 256, device=device)[:256]
            ref, _ = sa.span_attention_reference(q[sub].double(), k.double(), v.double(), plan.idx[sub],
                                                 plan.span_offsets)
            row["fwd_err_vs_float64"] = ((out[sub].double() - ref).norm() / ref.norm()).item()
        row["max_err_vs_default"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, baseline[inputs]))
        row["fwd_ms"] = triton.testing.do_bench(forward, warmup=20, rep=200, return_mode="median")
        row["fwd_bwd_ms"] = triton.testing.do_bench(forward_backward, warmup=20, rep=200, grad_to_none=leaves,
                                                    return_mode="median")
        row["kernel_ms"] = kernel_ms(forward_backward)
    except Exception as e:  # recorded; the next variant runs
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        for name, value in originals.items():  # the kernels and the switches
            setattr(sa, name, value)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="span_tiles.json")
    ap.add_argument("--kinds", default="self,cross")
    args = ap.parse_args()
    device = torch.device("cuda")
    baseline: dict = {}
    rows = []
    for var in VARIANTS:
        if var.kind in args.kinds.split(","):
            rows.append(run_variant(var, device, baseline))
            print(json.dumps(rows[-1]), flush=True)
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
