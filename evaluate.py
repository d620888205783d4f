"""Evaluate generated meshes: ``python evaluate.py pred_dir=DIR [ref_dir=DIR] [image_dir=DIR alignment.models=[...]]``.

- ``ref_dir``: reference meshes of the same stems -> Chamfer, F-score sweep, normal consistency.
- ``image_dir`` + ``alignment.models``: the input images of the same stems -> the paper's shape-image
  alignment (cosine similarity under ULIP-2 / Uni3D / OpenShape, checkpoints from ``alignment.<model>.ckpt``).
Writes ``metrics.csv`` (one row per mesh) and ``summary.json`` to ``out`` and prints the summary.
Configuration: configs/eval.yaml.
"""
import csv
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from d3ds2.eval import evaluate_pairs, list_meshes, match_meshes, summarise


def _geometry_rows(cfg: DictConfig) -> dict[str, dict]:
    pairs, unmatched = match_meshes(cfg.pred_dir, cfg.ref_dir)
    if unmatched:
        print(f"warning: {len(unmatched)} predictions have no reference of the same name: {unmatched[:5]}")
    rows = evaluate_pairs(pairs, cfg.thresholds, cfg.n_points, cfg.normalise, cfg.extent, cfg.seed)
    return {r["name"]: r for r in rows}


def _alignment_rows(cfg: DictConfig, meshes: list[Path]) -> dict[str, dict]:
    from d3ds2.eval.alignment import alignment_scores, load_alignment_model, match_images

    images = match_images([m.stem for m in meshes], cfg.image_dir)
    missing = [m.stem for m in meshes if m.stem not in images]
    if missing:
        print(f"warning: {len(missing)} meshes have no image of the same name in {cfg.image_dir}: {missing[:5]}")
    pairs = [(m, images[m.stem]) for m in meshes if m.stem in images]
    rows: dict[str, dict] = {m.stem: {} for m, _ in pairs}
    for name in cfg.alignment.models:
        model = load_alignment_model(name, device=cfg.alignment.device, **cfg.alignment[name])
        for (mesh, _), row in zip(pairs, alignment_scores(model, pairs, cfg.alignment.batch_size, cfg.seed)):
            rows[mesh.stem].update(row)
        del model
    return rows


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    if cfg.ref_dir is None and not cfg.alignment.models:
        raise SystemExit("evaluate.py: nothing to evaluate; give ref_dir=DIR (geometry) and/or image_dir=DIR "
                         "alignment.models=[ulip2,uni3d,openshape] (shape-image alignment)")
    if cfg.alignment.models and cfg.image_dir is None:
        raise SystemExit("evaluate.py: alignment.models needs image_dir=DIR (the input images, named like the meshes)")
    meshes = list_meshes(cfg.pred_dir)
    rows = {m.stem: {"name": m.stem} for m in meshes}
    for part in ([_geometry_rows(cfg)] if cfg.ref_dir is not None else []) + (
            [_alignment_rows(cfg, meshes)] if cfg.alignment.models else []):
        for stem, row in part.items():
            rows[stem].update(row)
    rows = list(rows.values())
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
