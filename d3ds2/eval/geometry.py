"""Geometry metrics of predicted meshes against reference meshes, matched by file stem.

Both sides are loaded with the project's mesh loader and (optionally) normalised into the same frame
([-1, 1] box, longest side 2·extent) so that thresholds mean the same thing for every pair. Matching is
strict by default: a prediction without a reference is an error, not a silently smaller mean.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from ..geometry.mesh_io import SUPPORTED_SUFFIXES, is_supported, load_mesh
from ..geometry.metrics import mesh_metrics
from ..geometry.normalize import normalise_mesh

FAILED_AS_ZERO = "mean_failed_as_0"  # summary suffix of an F-score mean where every failed mesh scores 0


class UnmatchedError(ValueError):
    """Predictions without a reference (or image) of the same stem under strict matching."""


def list_meshes(mesh_dir: str | Path, what: str = "meshes") -> list[Path]:
    """The mesh files (obj/glb/gltf/ply/stl/off) directly in ``mesh_dir``, sorted; raises if there are none."""
    mesh_dir = Path(mesh_dir)
    if not mesh_dir.is_dir():
        raise FileNotFoundError(f"{what} directory {str(mesh_dir)!r} does not exist")
    meshes = [p for p in sorted(mesh_dir.iterdir()) if p.is_file() and is_supported(str(p))]
    if not meshes:
        raise FileNotFoundError(f"no {what} ({', '.join(SUPPORTED_SUFFIXES)}) in {mesh_dir}")
    return meshes


def match_meshes(pred_dir: str | Path, ref_dir: str | Path, strict: bool = False
                 ) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Pairs (pred, ref) with the same stem, and the stems of predictions that have no reference.

    Raises FileNotFoundError when either directory holds no mesh, :class:`UnmatchedError` when no prediction
    has a reference, and (``strict``) when any prediction lacks one.
    """
    refs = {p.stem: p for p in list_meshes(ref_dir, "reference meshes")}
    preds = list_meshes(pred_dir, "predicted meshes")
    pairs = [(p, refs[p.stem]) for p in preds if p.stem in refs]
    unmatched = [p.stem for p in preds if p.stem not in refs]
    if not pairs:
        raise UnmatchedError(f"none of the {len(preds)} predictions in {pred_dir} has a reference of the same file "
                             f"stem in {ref_dir} (predictions: {[p.stem for p in preds[:5]]}, references: "
                             f"{sorted(refs)[:5]}); name each prediction after its reference")
    if strict and unmatched:
        raise UnmatchedError(f"{len(unmatched)} of {len(preds)} predictions in {pred_dir} have no reference of the "
                             f"same stem in {ref_dir}: {unmatched[:10]}; rename them, or pass strict=false to count "
                             "them as failed meshes")
    return pairs, unmatched


def evaluate_pairs(
    pairs: Iterable[tuple[Path, Path]],
    thresholds: Iterable[float] = (0.005, 0.01, 0.02, 0.05),
    n_points: int = 100_000,
    normalise: bool = True,
    extent: float = 0.95,
    seed: int = 0,
    edge_angle: float | None = 15.0,
    edge_spacing: float = 0.005,
    progress: bool = True,
) -> list[dict]:
    """One row per pair: name, the metrics of :func:`~d3ds2.geometry.metrics.mesh_metrics` (edge Chamfer with
    ``edge_angle`` / ``edge_spacing``), or ``error`` if a mesh failed to load or score."""
    rows = []
    pairs = list(pairs)
    for pred_path, ref_path in tqdm(pairs, desc="evaluating", unit="mesh", disable=not progress):
        row: dict = {"name": pred_path.stem}
        try:
            pred, ref = load_mesh(str(pred_path)), load_mesh(str(ref_path))
            if normalise:
                pred, _ = normalise_mesh(pred, extent)
                ref, _ = normalise_mesh(ref, extent)
            row.update(mesh_metrics(pred, ref, n_points=n_points, thresholds=tuple(thresholds), seed=seed,
                                    edge_angle=edge_angle, edge_spacing=edge_spacing))
        except Exception as err:  # a broken mesh is reported and counted as failed, never fatal
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def failed(row: dict) -> bool:
    """A row with any ``error`` / ``<model>_error`` entry."""
    return any(k == "error" or k.endswith("_error") for k in row)


def summarise(rows: list[dict]) -> dict[str, float]:
    """Aggregates that state what they cover.

    ``meshes``: rows; ``evaluated`` / ``failed``: rows without / with an ``error`` or ``*_error`` entry. For every
    numeric metric k: ``k/mean`` and ``k/median`` over the rows that have it and ``k/n``, their count. For every
    F-score column also ``k/mean_failed_as_0``: the mean over every row that was scored geometrically or failed
    to be (a row with ``error``), failures scoring 0, with ``k/n_failed_as_0`` rows.
    """
    n_failed = sum(failed(r) for r in rows)
    out: dict[str, float] = {"meshes": float(len(rows)), "evaluated": float(len(rows) - n_failed),
                             "failed": float(n_failed)}
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    geometry_rows = [r for r in rows if "error" in r or any(k.startswith("fscore@") for k in r)]
    for k in keys:
        vals = np.array([r[k] for r in rows if isinstance(r.get(k), (int, float))], dtype=np.float64)
        out[f"{k}/mean"] = float(vals.mean()) if len(vals) else math.nan
        out[f"{k}/median"] = float(np.median(vals)) if len(vals) else math.nan
        out[f"{k}/n"] = float(len(vals))
        if k.startswith("fscore@"):
            scores = [float(r.get(k, 0.0)) for r in geometry_rows]
            out[f"{k}/{FAILED_AS_ZERO}"] = float(np.mean(scores)) if scores else math.nan
            out[f"{k}/n_failed_as_0"] = float(len(scores))
    return out


def format_summary(summary: dict[str, float]) -> str:
    """The aggregates of :func:`summarise` as a text table: counts, then per metric its mean, median and the
    number of meshes they cover (and the F-score mean with failures as 0 over its count)."""
    lines = [f"meshes {int(summary['meshes'])}: evaluated {int(summary['evaluated'])}, failed {int(summary['failed'])}"]
    names = [k[: -len("/mean")] for k in summary if k.endswith("/mean")]
    if not names:
        return lines[0]
    width = max(len(n) for n in names + ["metric"])
    lines.append(f"{'metric':<{width}}  {'mean':>10}  {'median':>10}  {'n':>5}  {'mean, failed as 0 (n)':>22}")
    for n in names:
        zero = summary.get(f"{n}/{FAILED_AS_ZERO}")
        extra = f"{zero:10.5g} ({int(summary[f'{n}/n_failed_as_0'])})" if zero is not None else ""
        lines.append(f"{n:<{width}}  {summary[f'{n}/mean']:10.5g}  {summary[f'{n}/median']:10.5g}  "
                     f"{int(summary[f'{n}/n']):5d}  {extra:>22}")
    return "\n".join(lines)
