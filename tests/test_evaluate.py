"""evaluate.py's library part on procedural meshes: identical meshes score perfectly, perturbed ones don't."""
from __future__ import annotations

import numpy as np
import trimesh

from d3ds2.eval import evaluate_pairs, match_meshes, summarise


def test_metrics_rank_exact_above_perturbed(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    box = trimesh.creation.box((1.0, 0.6, 0.4))
    box.export(ref / "a.obj")
    box.export(pred / "a.obj")
    sphere = trimesh.creation.icosphere(3)
    sphere.export(ref / "b.ply")
    bumpy = sphere.copy()
    bumpy.vertices *= 1 + 0.05 * np.random.default_rng(0).standard_normal((len(bumpy.vertices), 1))
    bumpy.export(pred / "b.ply")
    (pred / "c.obj").write_text("this is not a mesh\n")
    (ref / "c.obj").write_text("v 0 0 0\n")
    (pred / "lonely.stl").write_bytes(trimesh.creation.box().export(file_type="stl"))

    pairs, unmatched = match_meshes(pred, ref)
    assert [p.stem for p, _ in pairs] == ["a", "b", "c"] and unmatched == ["lonely"]
    rows = {r["name"]: r for r in evaluate_pairs(pairs, thresholds=(0.01,), n_points=20000)}
    assert rows["a"]["fscore@0.01"] > 0.99 and rows["a"]["chamfer_l1"] < 2e-3
    assert rows["b"]["fscore@0.01"] < rows["a"]["fscore@0.01"] - 0.2
    assert rows["b"]["normal_consistency"] < rows["a"]["normal_consistency"]
    assert "error" in rows["c"]
    summary = summarise(list(rows.values()))
    assert summary["evaluated"] == 2 and summary["failed"] == 1
