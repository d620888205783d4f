"""Regenerate the measured tables of docs/benchmarks.md on a GPU, in one call (``make bench``).

Runs each maintained benchmark in its own process (its baseline timed in the same process), each writing
NAME.json and NAME.md through benchmarks/harness.py into ``--work``, and replaces the block between
``<!-- generated: NAME -->`` and ``<!-- /generated: NAME -->`` of ``--out`` with NAME.md after each one, so
that a time-out keeps what finished. The prose of the document (setups, targets, caveats) is not touched.

    python benchmarks/run_all.py --out docs/benchmarks.md [--only ssa dit_step] [--work bench_out]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name (the NAME.md the script writes) -> the script and its arguments, as the tables of docs/benchmarks.md need
BENCHMARKS = {
    "sparse_conv": ["benchmarks/sparse_conv.py"],
    "ssa": ["benchmarks/ssa.py", "--sizes", "131072", "--batches", "1", "4", "--quick",
            "--configs", "v1.1 (", "v1.1 shared", "v1.0@1024", "v1.0@512"],
    "dit_step": ["benchmarks/dit_step.py", "--tokens", "2058,5510,10655,45904", "--modes", "full-span,ssa-span"],
    "inference_offload": ["benchmarks/inference.py", "--offload"],
    "inference": ["benchmarks/inference.py"],
    "vae_step": ["benchmarks/vae_step.py", "--configs", "256x2", "256x4", "512x4", "1024x1", "--steps", "4"],
}


def replace_block(doc: str, name: str, body: str) -> str:
    """``doc`` with the text between the markers of ``name`` replaced by ``body``."""
    pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- /generated: {re.escape(name)} -->)",
                         re.DOTALL)
    if not pattern.search(doc):
        raise KeyError(f"no '<!-- generated: {name} -->' ... '<!-- /generated: {name} -->' block in the document; "
                       f"add one where the {name} table belongs")
    return pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="the document to update")
    ap.add_argument("--work", default="bench_out", help="folder for each benchmark's NAME.json / NAME.md / NAME.log")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="these benchmarks only")
    args = ap.parse_args()
    doc_path = Path(args.out)
    doc = doc_path.read_text()
    names = args.only or list(BENCHMARKS)
    for name in names:  # every marker present before any GPU time is spent
        replace_block(doc, name, "")
    os.makedirs(args.work, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    failed = []
    for name in names:
        cmd = [sys.executable, *BENCHMARKS[name], "--out", args.work]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        with open(Path(args.work) / f"{name}.log", "w") as log:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        md = Path(args.work) / f"{name}.md"
        print(f"   exit {done.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode or not md.is_file():
            failed.append(name)
            continue
        doc = replace_block(doc, name, md.read_text())
        doc_path.write_text(doc)
    if failed:
        print(f"failed: {failed} (see {args.work}/NAME.log); their tables were left as they were", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
