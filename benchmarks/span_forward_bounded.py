"""Bounded vs online-softmax span forward inside SSA (GPU): what sets ``BOUNDED_MIN_KEYS``.

SSA v1.1 (m_cmp = m_slc = m_win = 8, top-8) on the SS-DiT's 3 x 10,655-token batch (the latent cells of
benchmarks/dit_step.py), 32 q heads, 2 KV heads, head dim 32, bf16, random q / k / v. Three settings of the
span forward for all three branches (compressed: spans = samples' compressed tokens; selection: 8^3 blocks;
window: windows), timed A / B / C / A / B / C (``triton.testing.do_bench`` medians of forward and forward +
backward): *online* (running max), *bounded* (forced on every branch, ``BOUNDED_MIN_KEYS = 0``) and the
library *default*. Also: the tiles the bounded pass flagged for a redo per branch, and the output difference.
Full and cross-attention (spans of 10,655 and 1,374 keys) are in benchmarks/span_tiles.py.
Usage: python benchmarks/span_forward_bounded.py --out bounded.json
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

import d3ds2.kernels.span_attention as sa
from d3ds2.attention.ssa import SSAConfig, block_mean, build_ssa_layout, spatial_sparse_attention
from dit_step import shell_coords  # run as a script: benchmarks/ is on sys.path

SETTINGS = {"online": (False, sa.BOUNDED_MIN_KEYS), "bounded": (True, 0),
            "default": (sa.BOUNDED_FORWARD, sa.BOUNDED_MIN_KEYS)}  # (BOUNDED_FORWARD, BOUNDED_MIN_KEYS)


def ssa_problem(device):
    """Leaves (q, k, v, compressed k, v), gates, dO, layout and config of SSA v1.1 at 3 x 10,655 tokens."""
    cfg = SSAConfig(m_cmp=8, m_slc=8, m_win=8, topk=8)
    lay = build_ssa_layout(shell_coords(10655, 64, 3, device), cfg.m_cmp, cfg.m_slc)
    gen = torch.Generator(device=device).manual_seed(3)
    n = lay.num_tokens

    def randn(*shape):
        return torch.randn(shape, device=device, generator=gen).bfloat16()
    q, k, v = randn(n, 32, 32), randn(n, 2, 32), randn(n, 2, 32)
    kc = block_mean(k.reshape(n, -1).float() * 3, lay).view(-1, 2, 32).bfloat16()  # sharper compressed scores
    vc = block_mean(v.reshape(n, -1), lay).view(-1, 2, 32).bfloat16()
    gates = torch.rand(n, 3, device=device, generator=gen).bfloat16()
    leaves = [t.detach().requires_grad_() for t in (q, k, v, kc, vc)]
    return leaves, gates, randn(n, 32, 32), lay, cfg


def use(setting: str) -> None:
    sa.BOUNDED_FORWARD, sa.BOUNDED_MIN_KEYS = SETTINGS[setting]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="span_forward_bounded.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    leaves, gates, do, lay, cfg = ssa_problem(device)

    def forward():
        return spatial_sparse_attention(*leaves, gates, lay, cfg)

    def forward_backward():
        forward().backward(do)
    report = {"device": torch.cuda.get_device_name(device), "tokens": lay.num_tokens, "rows": []}
    launch, redo = sa._forward_launch, []

    def counting_launch(*a, **kw):  # records the redo flags of each bounded pass (a host sync: check only)
        launch(*a, **kw)
        if a[9] == 1:
            redo.append([int(a[11].sum()), a[11].numel()])
    outputs = {}
    sa._forward_launch = counting_launch
    try:
        for setting in SETTINGS:
            use(setting)
            outputs[setting] = forward().float()
    finally:
        sa._forward_launch = launch
    online = outputs["online"]
    report["redo_tiles_per_bounded_pass"] = redo  # [flagged, tiles x KV heads] per span_forward call
    report["rel_diff_vs_online"] = {s: ((o - online).norm() / online.norm()).item() for s, o in outputs.items()}
    for _ in range(2):
        for setting in SETTINGS:
            use(setting)
            row = {"setting": setting,
                   "fwd_ms": triton.testing.do_bench(forward, warmup=20, rep=200, return_mode="median"),
                   "fwd_bwd_ms": triton.testing.do_bench(forward_backward, warmup=20, rep=200, grad_to_none=leaves,
                                                         return_mode="median")}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    use("default")
    print(json.dumps({k: report[k] for k in ("redo_tiles_per_bounded_pass", "rel_diff_vs_online")}))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
