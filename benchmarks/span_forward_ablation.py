"""What bounds the span-attention forward kernel at the SS-DiT's shapes (GPU): ablations and an SFU probe.

Times the Triton forward kernel (self-attention, 3 x 10,655 tokens, 32 q heads, 2 KV heads, head dim 32, bf16)
in its online-softmax mode as it is and with one part of its loop removed, and the library's bounded forward
(no running max, see kernels/span_attention.py), in the same process:
- *no exp2*: p = a linear function of the score instead of exp2 (no SFU work; the rest of the loop unchanged);
- *no P @ V*: the second matmul dropped (and with it the V copies and the bf16 pack of P);
- *no running max*: the row maximum fixed at 0, so the row max, its shuffles and the rescaling of the
  accumulator drop out of the loop (what a forward that subtracts a precomputed bound on the scores would save);
- *128 keys per step*: the library's ``block_k`` at 128 instead of 64.
The ablated kernels compute wrong outputs on purpose; only their time is reported. The variants are the
library's kernel source with one or two lines replaced (the benchmark stops if a line is gone; a CPU test checks it),
compiled from a temporary module. The probe measures the SFU's exp2 rate with 4 independent exp2 chains per thread.
Usage: python benchmarks/span_forward_ablation.py --out ablation.json
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import tempfile

import torch
import triton
import triton.language as tl

import d3ds2.kernels.span_attention as sa
from span_tiles import problem

KERNEL = "_span_fwd_kernel"
ABLATIONS = {  # label: [(line of the kernel, its replacement), ...]
    "no exp2": [("p = tl.math.exp2(s * sm_scale_log2 - m_new[:, None])",
                 "p = (s * sm_scale_log2 - m_new[:, None]) * 0.001")],
    "no P @ V": [("acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)", "acc = acc * alpha[:, None]")],
    "no running max": [("m_i = tl.full([R], -1.0e30, tl.float32)", "m_i = tl.zeros([R], tl.float32)"),
                       ("m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)", "m_new = m_i")],
}


def ablated_kernel(label: str, directory: str):
    """The forward kernel with the lines of ``ABLATIONS[label]`` replaced, compiled from a module in ``directory``."""
    source = inspect.getsource(sa)
    start = source.index(f"    @triton.jit\n    def {KERNEL}(")
    end = source.index("    @triton.jit\n", start + 1)
    body = "\n".join(line[4:] for line in source[start:end].splitlines())  # out of the `if triton` block
    for old, new in ABLATIONS[label]:
        if old not in body:
            raise RuntimeError(f"{KERNEL} no longer contains {old!r}; update ABLATIONS")
        body = body.replace(old, new)
    name = "ablation_" + "".join(c if c.isalnum() else "_" for c in label)
    path = os.path.join(directory, name + ".py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from d3ds2.kernels.span_attention import BOUND_SUM_MIN, _query_rows, _tile_span\n")
        f.write(body)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, KERNEL)


@triton.jit
def _exp2_probe(X, Y, N_ITER: tl.constexpr):
    """4 independent chains of N_ITER exp2 per element (the multiply by -0.5 keeps the values bounded)."""
    offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    x = tl.load(X + offs)
    a, b, c, d = x * 0.001, x * 0.002, x * 0.003, x * 0.004
    for _ in range(N_ITER):
        a = tl.math.exp2(a) * -0.5
        b = tl.math.exp2(b) * -0.5
        c = tl.math.exp2(c) * -0.5
        d = tl.math.exp2(d) * -0.5
    tl.store(Y + offs, a + b + c + d)


def exp2_rate(device, clock_ghz: float) -> dict:
    """Measured exp2 per second, and per clock and multiprocessor at ``clock_ghz``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs, n_iter = sms * 64, 256
    x = torch.randn(programs * 1024, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: _exp2_probe[(programs,)](x, y, N_ITER=n_iter, num_warps=4), warmup=10,
                                 rep=100, return_mode="median")
    per_s = programs * 1024 * n_iter * 4 / (ms * 1e-3)
    return {"variant": "exp2 probe", "ms": ms, "exp2_per_s": per_s, "per_clock_per_sm": per_s / sms / (clock_ghz * 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="span_forward_ablation.json")
    ap.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock for the per-clock rates (H100/H200 SXM max)")
    args = ap.parse_args()
    device = torch.device("cuda")
    q, k, v, _, cu_q, cu_k, sample = problem("self", device)
    plan = sa.plan_spans(sample, cu_k, sa.default_block_m(q.shape[1] // k.shape[1], 1), query_offsets=cu_q,
                         check_unique=False)
    scale = q.shape[-1] ** -0.5
    exps = sum(int(n) ** 2 for n in cu_q.diff()) * q.shape[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("default", sa._span_fwd_kernel, 64, False)]
        variants += [(label, ablated_kernel(label, tmp), 64, False) for label in ABLATIONS]
        variants += [("128 keys per step", sa._span_fwd_kernel, 128, False),
                     ("default", sa._span_fwd_kernel, 64, False),
                     ("bounded forward (library default)", sa._span_fwd_kernel, 64, True)]
        original = sa._span_fwd_kernel
        for label, kernel, block_k, bounded in variants:
            sa._span_fwd_kernel = kernel
            try:
                ms = triton.testing.do_bench(lambda: sa.span_forward(q, k, v, plan, scale, block_k, bounded=bounded),
                                             warmup=25, rep=300, return_mode="median")
            finally:
                sa._span_fwd_kernel = original
            rows.append({"variant": label, "fwd_ms": ms, "bounded": bounded})
            print(json.dumps(rows[-1]), flush=True)
    probe = exp2_rate(device, args.clock_ghz)
    probe["exp2_bound_ms"] = exps / probe["exp2_per_s"] * 1e3  # this problem's exps at the measured rate
    rows.append(probe)
    print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
