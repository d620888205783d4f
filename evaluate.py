"""Evaluate meshes against references: ``python evaluate.py pred_dir=DIR ref_dir=DIR``.

Writes ``metrics.csv`` (one row per mesh) and ``summary.json`` to ``out`` and prints a summary table.
Configuration: configs/eval.yaml.
"""
import csv
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from d3ds2.eval import evaluate_pairs, match_meshes, summarise


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    pairs, unmatched = match_meshes(cfg.pred_dir, cfg.ref_dir)
    if unmatched:
        print(f"warning: {len(unmatched)} predictions have no reference of the same name: {unmatched[:5]}")
    rows = evaluate_pairs(pairs, cfg.thresholds, cfg.n_points, cfg.normalise, cfg.extent, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.5g}")
    print(f"per-mesh metrics: {out / 'metrics.csv'}")


if __name__ == "__main__":
    main()
