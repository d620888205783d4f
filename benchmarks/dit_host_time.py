"""Where an SS-DiT v1.1 training step waits on the host (GPU).

Per mode at 3 x 10,655 tokens (the rows of ``dit_step.py``): the step's wall time, the time the Python code
takes to issue it (until ``train_step`` returns, before the final synchronize; it includes every wait on
the GPU inside), the GPU kernel time and launch count (torch.profiler), and each synchronizing CUDA call
with the line of the project that made it (``torch.cuda.set_sync_debug_mode``); optionally the operators that
take the most host time, and the Python functions (cProfile); optionally each mode again with the dK/dV work
plan built by its PyTorch reference (the code before the one-launch kernel). A step whose wall time
exceeds its kernel time leaves the GPU idle for the difference: launch overhead or host syncs.
Usage: python benchmarks/dit_host_time.py --out host.json [--modes ssa-span,full-span] [--tokens 10655]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
import traceback
import warnings

import torch

import d3ds2.kernels.span_attention as span_kernels
from benchmarks.dit_step import build, make_batch, train_step
from d3ds2.kernels.span_work import work_plan, work_plan_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project_line(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of this repository outside the benchmarks (the code that synced)."""
    own = [f for f in stack if f.filename.startswith(ROOT) and "/benchmarks/" not in f.filename]
    f = own[-1] if own else stack[-1]
    return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})"


def host_syncs(model, opt, batch) -> dict[str, int]:
    """Synchronizing CUDA calls of one step, counted per project line."""
    sites: collections.Counter = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[_project_line(traceback.extract_stack()[:-1])] += 1
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            train_step(model, opt, *batch)
    finally:
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dict(sites.most_common())


def kernel_time(model, opt, batch) -> tuple[float, int]:
    """(GPU kernel ms, kernel launches) of one step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, *batch)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / 1e3, len(kernels)


def host_ops(model, opt, batch, top: int) -> list[dict]:
    """The ``top`` operators of one step by host (CPU) time spent in them, children excluded, with their call
    counts and the kernels they launched."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, opt, *batch)
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [dict(op=e.key[:100], calls=e.count, self_cpu_ms=round(e.self_cpu_time_total / 1e3, 2),
                 cpu_ms=round(e.cpu_time_total / 1e3, 2)) for e in ops[:top]]


def python_functions(model, opt, batch, top: int) -> list[dict]:
    """The ``top`` Python functions of one step by own time (cProfile; its overhead inflates every figure)."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.runcall(train_step, model, opt, *batch)
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [dict(function=f"{os.path.relpath(f, ROOT) if f.startswith(ROOT) else os.path.basename(f)}:{line} {name}",
                 calls=v[0], own_ms=round(v[2] * 1e3, 2), cumulative_ms=round(v[3] * 1e3, 2))
            for (f, line, name), v in rows]


def measure(mode: str, n: int, device, steps: int = 5, top: int = 0) -> dict:
    model, opt = build(mode, device)
    batch = make_batch(n, device)
    for _ in range(2):
        train_step(model, opt, *batch)
    walls, issues = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, opt, *batch)
        issues.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1e3)
    kernel_ms, launches = kernel_time(model, opt, batch)
    syncs = host_syncs(model, opt, batch)
    row = dict(mode=mode, tokens=n, step_ms=statistics.median(walls), step_ms_each=[round(w, 1) for w in walls],
               issue_ms=statistics.median(issues), kernel_ms=kernel_ms, launches=launches,
               idle_ms=statistics.median(walls) - kernel_ms, host_syncs=sum(syncs.values()), sync_sites=syncs)
    if top:
        row["host_ops"] = host_ops(model, opt, batch, top)
        row["python_functions"] = python_functions(model, opt, batch, top)
    del model, opt, batch
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dit_host_time.json")
    ap.add_argument("--modes", default="ssa-span,full-span")
    ap.add_argument("--tokens", type=int, default=10655)
    ap.add_argument("--reference-work-plan", action="store_true",
                    help="per mode, a second row with the dK/dV work plan built by its PyTorch reference (~30 ops)")
    ap.add_argument("--host-ops", type=int, default=0,
                    help="also list this many operators and Python functions (cProfile) by host time")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    runs = [(mode, ref) for mode in args.modes.split(",") for ref in ((False, True) if args.reference_work_plan
                                                                       else (False,))]
    for mode, ref in runs:
        span_kernels.work_plan = work_plan_reference if ref else work_plan
        rows.append(dict(measure(mode, args.tokens, device, top=args.host_ops), work_plan="reference" if ref
                         else "kernel"))
        span_kernels.work_plan = work_plan
        print(json.dumps(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
