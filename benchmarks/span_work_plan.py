"""Host time of the dK/dV work plan of SSA's selection branch (GPU): the one-launch kernel against its PyTorch
reference (kernels/span_work.py), on the plan of one SS-DiT v1.1 layer at 3 x 10,655 tokens.

The selection plan is rebuilt in every layer (its top-k differs), so its work plan is a per-layer host cost of
the training step, which is bound by its host time (benchmarks/dit_host_time.py). Per variant: the time to
issue one build (no synchronize) and the time until its results are on the GPU, medians of 200 builds after
warm-up; the outputs are checked equal first.
Usage: python benchmarks/span_work_plan.py --out work_plan.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.dit_step import SSA_V11, make_batch
from d3ds2.attention.ssa import build_ssa_layout, selection_plan
from d3ds2.kernels.span_attention import ROWS_PER_ITEM
from d3ds2.kernels.span_work import work_plan, work_plan_reference

HKV, GROUP, BLOCK_KV = 2, 16, 64


def selection(device):
    """The selection plan of one layer: random top-8 blocks of each query's sample, per KV head."""
    x = make_batch(10655, device)[0]
    layout = build_ssa_layout(x.coords, SSA_V11["m_cmp"], SSA_V11["m_slc"])
    gen = torch.Generator(device=device).manual_seed(0)
    lo = layout.sample_block_offsets[layout.sample_of_token.long()]
    n = (layout.sample_block_offsets[layout.sample_of_token.long() + 1] - lo).float()
    scores = torch.rand(x.num_voxels, HKV, int(n.max()), device=device, generator=gen)
    scores = scores.masked_fill(torch.arange(scores.shape[-1], device=device) >= n[:, None, None], -1)
    idx = (scores.topk(SSA_V11["topk"], dim=-1).indices + lo[:, None, None]).int()
    return selection_plan(idx, layout, GROUP), x.num_voxels


def time_build(build, reps: int = 200) -> dict:
    for _ in range(10):
        build()
    issue, done = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        build()
        issue.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        done.append((time.perf_counter() - start) * 1e3)
    return dict(issue_ms=statistics.median(issue), done_ms=statistics.median(done))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="work_plan.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    plan, n_keys = selection(device)
    soff, poff = plan.span_offsets, plan.pairs()[0]
    per_item = ROWS_PER_ITEM // GROUP
    args_ = (soff, poff, n_keys, BLOCK_KV, HKV, per_item)
    same = all(torch.equal(a, b) for a, b in zip(work_plan(*args_), work_plan_reference(*args_)))
    rows = {name: time_build(lambda f=f: f(*args_)) for name, f in (("reference (PyTorch)", work_plan_reference),
                                                                    ("kernel", work_plan))}
    report = dict(device=torch.cuda.get_device_name(device), spans=plan.n_spans, keys=n_keys, equal=same, rows=rows)
    print(json.dumps(report), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
