"""Geometry metrics of predicted meshes against reference meshes, matched by file stem.

Both sides are loaded with the project's mesh loader and (optionally) normalised into the same frame
([-1, 1] box, longest side 2·extent) so that thresholds mean the same thing for every pair.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from ..geometry.mesh_io import is_supported, load_mesh
from ..geometry.metrics import mesh_metrics
from ..geometry.normalize import normalise_mesh


def list_meshes(mesh_dir: str | Path) -> list[Path]:
    """The mesh files (obj/glb/gltf/ply/stl/off) directly in ``mesh_dir``, sorted; raises if there are none."""
    meshes = [p for p in sorted(Path(mesh_dir).iterdir()) if p.is_file() and is_supported(str(p))]
    if not meshes:
        raise FileNotFoundError(f"no meshes (obj/glb/gltf/ply/stl/off) in {mesh_dir}")
    return meshes


def match_meshes(pred_dir: str | Path, ref_dir: str | Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Pairs (pred, ref) with the same stem, and the stems of predictions that have no reference."""
    refs = {p.stem: p for p in sorted(Path(ref_dir).iterdir()) if p.is_file() and is_supported(str(p))}
    preds = list_meshes(pred_dir)
    pairs = [(p, refs[p.stem]) for p in preds if p.stem in refs]
    return pairs, [p.stem for p in preds if p.stem not in refs]


def evaluate_pairs(
    pairs: Iterable[tuple[Path, Path]],
    thresholds: Iterable[float] = (0.005, 0.01, 0.02, 0.05),
    n_points: int = 100_000,
    normalise: bool = True,
    extent: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """One row per pair: name, the metrics of :func:`mesh_metrics`, or ``error`` if a mesh failed to load."""
    rows = []
    pairs = list(pairs)
    for pred_path, ref_path in tqdm(pairs, desc="evaluating", unit="mesh"):
        row: dict = {"name": pred_path.stem}
        try:
            pred, ref = load_mesh(str(pred_path)), load_mesh(str(ref_path))
            if normalise:
                pred, _ = normalise_mesh(pred, extent)
                ref, _ = normalise_mesh(ref, extent)
            row.update(mesh_metrics(pred, ref, n_points=n_points, thresholds=tuple(thresholds), seed=seed))
        except Exception as err:  # a broken mesh is reported, never fatal
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict[str, float]:
    """Counts (``evaluated``: rows without any ``error`` / ``*_error`` entry, ``failed``: the others) and the mean
    and median of every numeric metric over the rows that have it."""
    failed = sum(any(k == "error" or k.endswith("_error") for k in r) for r in rows)
    out: dict[str, float] = {"evaluated": float(len(rows) - failed), "failed": float(failed)}
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for k in keys:
        vals = np.array([r[k] for r in rows if isinstance(r.get(k), (int, float))], dtype=np.float64)
        out[f"{k}/mean"] = float(vals.mean()) if len(vals) else math.nan
        out[f"{k}/median"] = float(np.median(vals)) if len(vals) else math.nan
    return out
