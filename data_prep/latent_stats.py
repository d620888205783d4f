"""Per-channel mean/std of the latents in latent shards (for the DiT's latent normalisation).

Usage: python data_prep/latent_stats.py 'data/latents/512/train-*.tar' data/latents/512/stats.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from d3ds2.training.dit_datamodule import expand_shards, read_latent_shard


def latent_stats(shards: list[str]) -> dict:
    """{"mean": [C], "std": [C], "tokens": int, "samples": int} over every latent token (float64 sums)."""
    total, sq, count, samples = None, None, 0, 0
    for path in shards:
        for s in read_latent_shard(path):
            f = s["feats"].astype(np.float64)
            total = f.sum(0) if total is None else total + f.sum(0)
            sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
            count += len(f)
            samples += 1
    if count == 0:
        raise ValueError(f"no latent tokens in {shards}")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "tokens": count, "samples": samples}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: latent_stats.py SHARD_GLOB OUT.json")
    stats = latent_stats(expand_shards(argv[0]))
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, out)
    print(f"{stats['samples']} samples, {stats['tokens']} tokens -> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
