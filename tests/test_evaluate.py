"""evaluate.py and its library part on procedural meshes: identical meshes score perfectly, perturbed ones
don't; unmatched or missing references never pass silently; failed meshes count against the means."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from d3ds2.eval import evaluate_pairs, match_meshes, summarise
from d3ds2.eval.geometry import UnmatchedError

ROOT = Path(__file__).resolve().parents[1]


def make_dirs(tmp_path: Path) -> tuple[Path, Path]:
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
    return pred, ref


def test_metrics_rank_exact_above_perturbed_and_failures_count(tmp_path):
    pred, ref = make_dirs(tmp_path)
    (pred / "lonely.stl").write_bytes(trimesh.creation.box().export(file_type="stl"))
    pairs, unmatched = match_meshes(pred, ref)
    assert [p.stem for p, _ in pairs] == ["a", "b", "c"] and unmatched == ["lonely"]
    with pytest.raises(UnmatchedError, match=r"1 of 4 predictions.*\['lonely'\].*strict=false"):
        match_meshes(pred, ref, strict=True)
    rows = {r["name"]: r for r in evaluate_pairs(pairs, thresholds=(0.01,), n_points=20000, progress=False)}
    assert rows["a"]["fscore@0.01"] > 0.99 and rows["a"]["chamfer_l1"] < 2e-3
    assert rows["a"]["edge_chamfer"] < 1e-9  # the same box: the same sharp edges
    assert rows["b"]["fscore@0.01"] < rows["a"]["fscore@0.01"] - 0.2
    assert rows["b"]["normal_consistency"] < rows["a"]["normal_consistency"]
    assert "edge_chamfer" not in rows["b"]  # a smooth reference has no sharp edge: undefined, not 0
    assert "error" in rows["c"]
    summary = summarise(list(rows.values()))
    assert summary["meshes"] == 3 and summary["evaluated"] == 2 and summary["failed"] == 1
    f_a, f_b = rows["a"]["fscore@0.01"], rows["b"]["fscore@0.01"]
    assert summary["fscore@0.01/mean"] == pytest.approx((f_a + f_b) / 2) and summary["fscore@0.01/n"] == 2
    assert summary["fscore@0.01/mean_failed_as_0"] == pytest.approx((f_a + f_b) / 3)  # c scores 0
    assert summary["fscore@0.01/n_failed_as_0"] == 3
    assert summary["edge_chamfer/n"] == 1 and summary["chamfer_l1/n"] == 2


def run_evaluate(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"out={tmp_path / 'out'}", "n_points=3000",
           "hydra.run.dir=" + str(tmp_path / "hydra"), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, timeout=300)


def config(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "d3ds2" / "configs"), version_base="1.3"):
        return compose("eval", [f"out={tmp_path / 'out'}", "n_points=3000", *overrides])


def test_script_exits_non_zero_on_an_empty_reference_dir(tmp_path):
    pred, _ = make_dirs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_evaluate(tmp_path, f"pred_dir={pred}", f"ref_dir={empty}")
    assert res.returncode != 0 and "no reference meshes" in res.stderr


def test_evaluation_never_passes_unmatched_and_counts_failures(tmp_path, capsys):
    from d3ds2.cli.evaluate import evaluate

    pred, ref = make_dirs(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    trimesh.creation.box().export(other / "zzz.obj")
    with pytest.raises(UnmatchedError, match="none of the 3 predictions"):
        evaluate(config(tmp_path, f"pred_dir={pred}", f"ref_dir={other}"))
    (pred / "lonely.obj").write_text(trimesh.creation.box().export(file_type="obj"))
    with pytest.raises(UnmatchedError, match=r"lonely.*strict=false"):  # strict by default
        evaluate(config(tmp_path, f"pred_dir={pred}", f"ref_dir={ref}"))
    summary = evaluate(config(tmp_path, f"pred_dir={pred}", f"ref_dir={ref}", "strict=false", "thresholds=[0.02]"))
    m = summary["metrics"]
    assert m["meshes"] == 4 and m["evaluated"] == 2 and m["failed"] == 2  # c (broken) + lonely (unmatched)
    assert m["fscore@0.02/n_failed_as_0"] == 4 and m["fscore@0.02/n"] == 2
    assert m["fscore@0.02/mean_failed_as_0"] == pytest.approx(m["fscore@0.02/mean"] / 2)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"] == m
    printed = capsys.readouterr().out
    assert summary["protocol"]["name"] == "d3ds2" and "meshes 4: evaluated 2, failed 2" in printed
    assert any(line.split()[:1] == ["fscore@0.02"] and line.split()[3] == "2" and line.split()[-1] == "(4)"
               for line in printed.splitlines())
    assert "no reference named lonely" in (tmp_path / "out" / "metrics.csv").read_text()
    bad = tmp_path / "bad"  # every mesh failing: no metric, an error
    bad.mkdir()
    (bad / "a.obj").write_text("not a mesh\n")
    with pytest.raises(RuntimeError, match="no mesh was scored"):
        evaluate(config(tmp_path, f"pred_dir={bad}", f"ref_dir={ref}"))
    with pytest.raises(KeyError, match="unknown alignment protocol 'nope'"):
        evaluate(config(tmp_path, f"pred_dir={pred}", f"ref_dir={ref}", "protocol=nope"))
    with pytest.raises(ValueError, match="needs image_dir"):
        evaluate(config(tmp_path, f"pred_dir={pred}", "alignment.models=[ulip2]"))


def test_alignment_without_matching_images_is_an_error(tmp_path):
    from d3ds2.cli.evaluate import evaluate
    from PIL import Image

    pred, _ = make_dirs(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    with pytest.raises(UnmatchedError, match=r"2 of 3 meshes have no image.*\['b', 'c'\]"):
        evaluate(config(tmp_path, f"pred_dir={pred}", f"image_dir={images}", "alignment.models=[ulip2]"))
    (images / "a.png").rename(images / "other.png")
    with pytest.raises(UnmatchedError, match="3 of 3 meshes"):  # none matching: an error even with strict=false
        evaluate(config(tmp_path, f"pred_dir={pred}", f"image_dir={images}", "alignment.models=[ulip2]",
                        "strict=false"))


def test_sweep_config_composes_as_a_multirun():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "d3ds2" / "configs"), version_base="1.3"):
        cfg = compose("eval_sweep", ["out=unused"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.protocol == "d3ds2" and cfg.strict
    assert dict(cfg.hydra.sweeper.params) == {"generate.steps": "20,30", "generate.guidance": "5.0,7.0",
                                              "generate.seed": "0,1"}
    assert cfg.hydra.callbacks.sweep_summary._target_ == "d3ds2.eval.sweep.SweepSummary"
