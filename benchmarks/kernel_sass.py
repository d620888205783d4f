"""Instruction-level view of the span-attention kernels, without a GPU.

Compiles the Triton kernels for sm_90 (H100/H200) with the ``ptxas`` that ships in the triton wheel,
disassembles them with its ``cuobjdump`` and reports, per kernel: registers per thread, spill (stack) bytes,
shared memory, the wgmma shapes, and the instruction mix of its innermost loop counted per attention score
and thread (a warp issues one instruction per clock per SM sub-partition, the SFU runs 16 exp2 per clock
per SM: the two bounds docs/benchmarks.md compares the kernels to). Pointer arguments are compiled as
16-byte aligned, as the JIT specialises them at run time (without that hint the loads are scalar).

Shapes: the SS-DiT's attention (32 q heads, 2 KV heads, head dim 32, bf16) with the default tiles.
Usage: python benchmarks/kernel_sass.py [--out report.md] [--keep DIR] [--json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

import d3ds2.kernels.span_backward as bwd
import d3ds2.kernels.span_dkdv_hopper as hopper
import d3ds2.kernels.span_forward as fwd_kernels
from d3ds2.kernels.span_common import SPAN_STAGES, _num_warps
from d3ds2.kernels.span_plan import default_block_m

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HQ, HKV, D = 32, 2, 32


@dataclass
class Compiled:
    """One kernel compiled for sm_90: its SASS text and resource usage (registers per thread, stack bytes
    per thread = spills, static + dynamic shared bytes per CTA)."""

    name: str
    sass: str
    registers: int
    stack: int
    shared: int
    num_warps: int
    scores_per_iteration: int  # scores (rows x keys) one trip of the innermost loop computes


def tools_available() -> bool:
    return all(os.access(os.path.join(TOOLS, t), os.X_OK) for t in ("ptxas", "cuobjdump"))


def compile_sm90(name: str, fn, signature: dict[str, str], constexprs: dict, num_warps: int,
                 scores_per_iteration: int, keep: str | None = None, gluon: bool = False) -> Compiled:
    """Compile ``fn`` (a @triton.jit kernel, or @gluon.jit with ``gluon``) for sm_90; ``signature`` maps every
    argument to its Triton type ('*bf16', 'i32', ...), constexpr arguments included (values in ``constexprs``)."""
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = (GluonASTSource if gluon else ASTSource)(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": SPAN_STAGES})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(keep or tmp, f"{name}.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    if keep:
        with open(os.path.join(keep, f"{name}.sass"), "w") as f:
            f.write(sass)
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    return Compiled(name, sass, field("REG"), field("STACK"), kernel.metadata.shared, num_warps, scores_per_iteration)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9]*)(\.[A-Z0-9_.]+)?")
_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?BRA\s+(?:!?U?P[T\d], )?0x([0-9a-f]+)")


def _innermost_span(sass: str) -> tuple[int, int]:
    """Address range of the shortest loop: a backward branch and the instructions it jumps over ((0, -1): none)."""
    loops = [(int(m.group(2), 16), int(m.group(1), 16)) for m in map(_BRANCH.search, sass.splitlines())
             if m and int(m.group(2), 16) < int(m.group(1), 16)]
    return min(loops, key=lambda span: span[1] - span[0]) if loops else (0, -1)


def innermost_loop(sass: str) -> collections.Counter:
    """Opcode counts of the shortest loop, every instruction of the body counted once, the masking of partial
    chunks included (interior chunks skip it)."""
    return collections.Counter(op for op, _ in _loop_opcodes(sass))


def wgmma_before_wait(sass: str) -> int:
    """wgmma instructions the innermost loop issues before it first waits on one (WARPGROUP.DEPBAR): how much
    tensor-core work is in flight while the warps go on (a Triton loop waits after each matmul)."""
    ops = _loop_opcodes(sass)
    first_wait = next((i for i, (op, suffix) in enumerate(ops) if op == "WARPGROUP" and "DEPBAR" in suffix), len(ops))
    return sum(op == "HGMMA" for op, _ in ops[:first_wait])


def _loop_opcodes(sass: str) -> list[tuple[str, str]]:
    """(opcode, suffix) of the innermost loop's instructions in program order."""
    lo, hi = _innermost_span(sass)
    return [(m.group(2), m.group(3) or "") for m in map(_INSTRUCTION.search, sass.splitlines())
            if m and lo <= int(m.group(1), 16) <= hi]


def per_score(kernel: Compiled, count: int) -> float:
    """Instructions per score and thread: ``count`` per loop trip, executed by every thread of the CTA."""
    return count * 32 * kernel.num_warps / kernel.scores_per_iteration


def span_kernels(keep: str | None = None) -> list[Compiled]:
    """The forward (bounded and online softmax), dQ and dK/dV kernels at the default tiles of
    :func:`d3ds2.kernels.span_attention.span_attention`."""
    g = HQ // HKV
    bm, bk, bq, bkv = default_block_m(g, 1), 64, max(1, 128 // g), 64
    shapes = dict(HQ=HQ, HKV=HKV, G=g, D=D, HAS_QIDX=False)
    plan = dict(QIDX="*i32", IDX="*i32", UNION="*i32", UCNT="*i32", UFULL="*i8", SOFF="*i32", n_q="i32",
                n_tiles="i32")
    tiles = dict(HI=1, TOPK=1, TOPK_P=1, UMAX=bm, BM=bm, BK=bk)
    plan_ids = {name: t for name, t in plan.items() if name not in ("n_q", "n_tiles")}
    fwd_signature = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", **plan_ids,
                     "KB": "*fp32", "REDO": "*i32", "n_q": "i32", "n_tiles": "i32", "sm_scale_log2": "fp32"}
    fwd = [compile_sm90(name, fwd_kernels._span_fwd_kernel, fwd_signature, {**shapes, **tiles, "MODE": mode},
                        _num_warps(bm * g, D), bm * g * bk, keep)
           for name, mode in (("forward (bounded)", 1), ("forward (online softmax)", 0))]
    dq = compile_sm90("dQ", bwd._span_bwd_dq_kernel,
                      {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "LSE": "*fp32",
                       "DELTA": "*fp32", "COLS": "*bf16", "DQ": "*bf16", **plan, "sm_scale": "fp32", "sm_scale_log2": "fp32"},
                      {**shapes, **tiles, "ACC": False}, _num_warps(bm * g, D), bm * g * bk, keep)
    dkdv_signature = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "COLS": "*bf16", "DK": "*fp32",
                      "DV": "*fp32", "QIDX": "*i32", "CH_SPAN": "*i32", "CH_START": "*i32", "SOFF": "*i32",
                      "POFF": "*i32", "PQ": "*i32", "CUM_ITEMS": "*i32", "NEXT_ITEM": "*i32", "n_slots": "i32",
                      "n_chunk_slots": "i32", "n_spans": "i32", "sm_scale": "fp32", "sm_scale_log2": "fp32"}
    dkdv_shape = {**shapes, "HI": 1, "BQ": bq, "BK": bkv, "PER_ITEM": bwd.ROWS_PER_ITEM // g, "SEARCH_STEPS": 12}
    dkdv = compile_sm90("dK-dV", bwd._span_bwd_dkdv_kernel, dkdv_signature, dkdv_shape, _num_warps(bq * g, D),
                        bq * g * bkv, keep)
    hopper_dkdv = compile_sm90("dK-dV (Gluon)", hopper._span_dkdv_hopper_kernel, dkdv_signature,
                               {**dkdv_shape, "STAGES": hopper.STAGES}, 4, bq * g * bkv, keep, gluon=True)
    return [*fwd, dq, dkdv, hopper_dkdv]


def summary(kernels: list[Compiled]) -> list[dict]:
    """Per kernel: resources, wgmma shapes and the innermost loop's instructions per score and thread (all,
    exp2 on the SFU, bf16 packs, and per opcode)."""
    rows = []
    for k in kernels:
        loop = innermost_loop(k.sass)
        rows.append(dict(kernel=k.name, warps=k.num_warps, registers=k.registers, spill_bytes=k.stack,
                         shared_kib=k.shared / 1024, wgmma=sorted(set(re.findall(r"HGMMA\.(\d+x\d+x\d+)", k.sass))),
                         per_score=per_score(k, sum(loop.values())), exp2_per_score=per_score(k, loop["MUFU"]),
                         packs_per_score=per_score(k, loop["F2FP"]), wgmma_before_wait=wgmma_before_wait(k.sass),
                         opcodes_per_score={op: round(per_score(k, n), 3) for op, n in loop.most_common()}))
    return rows


def report(rows: list[dict]) -> str:
    lines = ["| kernel | warps | registers | spill bytes | shared KiB | wgmma shapes | loop instructions / score"
             " | of which exp2 / bf16 packs | wgmma before the first wait |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['warps']} | {r['registers']} | {r['spill_bytes']} | {r['shared_kib']:.0f} | "
              f"{', '.join(r['wgmma'])} | {r['per_score']:.1f} | {r['exp2_per_score']:.2f} / "
              f"{r['packs_per_score']:.2f} | {r['wgmma_before_wait']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--keep", default=None, help="directory for the cubin and SASS files")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_sass: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    if not tools_available():
        raise SystemExit(f"kernel_sass: ptxas / cuobjdump not found in {TOOLS} (they ship with the triton wheel)")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = summary(span_kernels(args.keep))
    if args.json:
        print(json.dumps(rows))
        return
    table = report(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
