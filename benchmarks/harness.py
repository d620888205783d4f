"""What every maintained benchmark shares: timing (CUDA events, the median of timed calls after warm-up; wall
clock on the CPU), peak memory, the device line, and the outputs (NAME.json with the figures and how they were
made, NAME.md with the table that benchmarks/run_all.py puts into docs/benchmarks.md).

Benchmarks import it as ``from harness import ...`` (run them from the repository root as
``python benchmarks/NAME.py``: Python puts benchmarks/ on the path)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 30,
              grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median milliseconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones. On a GPU each call is
    timed by a pair of CUDA events (device time of the work fn enqueues, host gaps included); elsewhere by the
    wall clock. ``grad_to_none``: tensors whose .grad is reset before every call (fwd+bwd timings)."""
    cuda = torch.cuda.is_available()

    def call():
        for t in grad_to_none:
            t.grad = None
        fn()

    for _ in range(warmup):
        call()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated GPU memory (GiB) while ``fn`` runs, the tensors alive before it included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def device_line() -> str:
    """The machine the figures come from: GPU name (or CPU), torch, triton and CUDA versions."""
    parts = [torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} threads)", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out_dir: str, name: str, markdown: str, data: dict) -> str:
    """Write ``out_dir``/NAME.json (``data`` + date, device, command, commit) and NAME.md (a line with the date,
    device and command, then ``markdown``), each atomically, so that partial results survive a time-out.
    Returns the markdown written."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "device": device_line(),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "commit": _commit()}
    md = (f"{meta['date']}, {meta['device']}, commit {meta['commit']}: `{meta['command']}`\n\n"
          + markdown.strip() + "\n")
    for suffix, text in ((".json", json.dumps({**meta, **data}, indent=1)), (".md", md)):
        path = os.path.join(out_dir, name + suffix)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return md
