"""Evaluate meshes: ``python evaluate.py pred_dir=DIR [ref_dir=DIR] [image_dir=DIR alignment.models=[...]]``.

- ``ref_dir``: reference meshes of the same stems -> Chamfer, F-score sweep, normal consistency, edge Chamfer.
- ``image_dir`` + ``alignment.models``: the input images of the same stems -> shape-image alignment (cosine
  similarity under ULIP-2 / Uni3D / OpenShape / ULIP-1, prepared as ``protocol`` says).
- ``generate.ckpt.*``: generate the predictions from ``image_dir`` first; with ``-m`` a Hydra sweep over
  checkpoints x sampler steps x guidance x seeds, summarised in one table and plot when it ends.
Writes ``metrics.csv`` (one row per mesh) and ``summary.json`` (aggregates with their counts, protocol,
checkpoints, sampler settings) to ``out``. Unmatched names are an error (``strict``); a run that scores no
mesh exits non-zero. Configuration: d3ds2/configs/eval.yaml; docs/evaluation.md.
"""
import csv
import json
import logging
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from d3ds2.eval import evaluate_pairs, list_meshes, match_meshes, summarise
from d3ds2.eval.geometry import UnmatchedError, format_summary
from d3ds2.eval.protocols import get_protocol

log = logging.getLogger("evaluate")


def _geometry_rows(cfg: DictConfig, pred_dir: Path) -> dict[str, dict]:
    pairs, unmatched = match_meshes(pred_dir, cfg.ref_dir, strict=cfg.strict)
    rows = evaluate_pairs(pairs, cfg.thresholds, cfg.n_points, cfg.normalise, cfg.extent, cfg.seed,
                          cfg.edge_angle, cfg.edge_spacing)
    rows += [{"name": s, "error": f"no reference named {s} in {cfg.ref_dir}"} for s in unmatched]
    return {r["name"]: r for r in rows}


def _alignment_rows(cfg: DictConfig, meshes: list[Path], protocol) -> dict[str, dict]:
    from d3ds2.eval.alignment import alignment_scores, load_alignment_model, match_images

    images = match_images([m.stem for m in meshes], cfg.image_dir)
    missing = [m.stem for m in meshes if m.stem not in images]
    if missing and (cfg.strict or len(missing) == len(meshes)):
        raise UnmatchedError(f"{len(missing)} of {len(meshes)} meshes have no image of the same stem in "
                             f"{cfg.image_dir}: {missing[:10]}; rename them, or pass strict=false to count them "
                             "as failed meshes")
    pairs = [(m, images[m.stem]) for m in meshes if m.stem in images]
    rows: dict[str, dict] = {m.stem: {} for m, _ in pairs}
    rows.update({s: {"alignment_error": f"no image named {s} in {cfg.image_dir}"} for s in missing})
    for name in cfg.alignment.models:
        model = load_alignment_model(name, device=cfg.alignment.device, protocol=protocol, **cfg.alignment[name])
        for (mesh, _), row in zip(pairs, alignment_scores(model, pairs, cfg.alignment.batch_size, cfg.seed,
                                                          protocol=protocol)):
            rows[mesh.stem].update(row)
        del model
    return rows


def _generate(cfg: DictConfig, out: Path) -> tuple[Path, list[dict], dict]:
    from d3ds2.eval.generate import checkpoint_records, generate_meshes, list_images, stage_settings

    gen = cfg.generate
    record = {"checkpoints": checkpoint_records(gen.ckpt), "sampler": {**stage_settings(gen), "seed": gen.seed,
                                                                        "resolution": gen.resolution}}
    (out / "generation.json").write_text(json.dumps(record, indent=2))  # kept even if loading fails below
    images = list_images(gen.images or cfg.image_dir)
    _, failures = generate_meshes(gen, images, out / "meshes")
    return out / "meshes", failures, record


def evaluate(cfg: DictConfig) -> dict:
    """Generate (optional), score, write metrics.csv + summary.json; returns the summary record."""
    protocol = get_protocol(cfg.protocol)
    if cfg.ref_dir is None and not cfg.alignment.models:
        raise ValueError("evaluate.py: nothing to evaluate; give ref_dir=DIR (geometry) and/or image_dir=DIR "
                         "alignment.models=[ulip2,uni3d,openshape] (shape-image alignment)")
    if cfg.alignment.models and cfg.image_dir is None:
        raise ValueError("evaluate.py: alignment.models needs image_dir=DIR (the input images, named like the meshes)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    generation_failures, record = [], {"checkpoints": {}, "sampler": None}
    pred_dir = cfg.pred_dir
    generated = cfg.generate.ckpt.index_dit is not None
    if generated:
        if pred_dir is not None:
            raise ValueError("evaluate.py: give either pred_dir (score existing meshes) or generate.ckpt.* "
                             "(generate them), not both")
        pred_dir, generation_failures, record = _generate(cfg, out)
    elif pred_dir is None:
        raise ValueError("evaluate.py: pred_dir=DIR is not set (or set generate.ckpt.* to generate the meshes)")
    # generated: may hold no mesh when every batch failed (each image is then a failed row)
    meshes = sorted(Path(pred_dir).glob("*.glb")) if generated else list_meshes(pred_dir, "predicted meshes")
    rows = {m.stem: {"name": m.stem} for m in meshes}
    parts = [_geometry_rows(cfg, Path(pred_dir))] if cfg.ref_dir is not None and meshes else []
    parts += [_alignment_rows(cfg, meshes, protocol)] if cfg.alignment.models and meshes else []
    for part in parts:
        for stem, row in part.items():
            rows[stem].update(row)
    for row in generation_failures:
        rows[row["name"]] = row
    rows = list(rows.values())
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    result = {"status": "ok" if summary["evaluated"] > 0 else "failed", "protocol": protocol.describe(),
              "alignment_models": list(cfg.alignment.models),
              "pred_dir": str(pred_dir), "ref_dir": cfg.ref_dir, "image_dir": cfg.image_dir, **record,
              "metrics": summary}
    if summary["evaluated"] == 0:
        result["error"] = f"no mesh was scored ({int(summary['failed'])} failed; metrics.csv has the reasons)"
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(format_summary(summary))
    print(f"protocol {protocol.name}; per-mesh metrics: {out / 'metrics.csv'}")
    if result["status"] != "ok":
        raise RuntimeError(f"evaluate.py: {result['error']}")
    return result


@hydra.main(version_base="1.3", config_path="pkg://d3ds2.configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        try:
            evaluate(cfg)
        except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
            message = err.args[0] if err.args else repr(err)
            raise SystemExit(message if str(message).startswith("evaluate.py") else f"evaluate.py: {message}") from err
        return
    try:  # a sweep point that fails is recorded and the sweep goes on
        evaluate(cfg)
    except Exception as err:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = out / "summary.json"
        record = json.loads(summary.read_text()) if summary.is_file() else {}
        gen = out / "generation.json"
        record.update(json.loads(gen.read_text()) if gen.is_file() and "checkpoints" not in record else {})
        record.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                      protocol=record.get("protocol", cfg.protocol))
        summary.write_text(json.dumps(record, indent=2))
        log.error("sweep point %s failed: %s", OmegaConf.to_container(HydraConfig.get().overrides.task), err)


if __name__ == "__main__":
    main()
