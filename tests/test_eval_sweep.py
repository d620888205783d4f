"""evaluate.py -m: a 2x2 sweep (checkpoint x guidance) on tiny random models, generating and scoring each
point; the checkpoint that does not exist is recorded as failed and the sweep goes on to its table and plot."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh
import yaml

from test_inference import INDEX_DIT, INDEX_VAE, SPARSE_DIT, SPARSE_VAE, TINY_DINO, make_run, rgba_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_generates_scores_and_summarises(tmp_path):
    pytest.importorskip("d3ds2.geometry.marching_cubes", reason="needs the sparse marching cubes")
    runs = tmp_path / "runs"
    vae = make_run(runs, "index_vae", {"net": INDEX_VAE}, 0)
    index_dit = make_run(runs, "index_dit", {"net": INDEX_DIT, "vae": INDEX_VAE,
                                             "vae_ckpt": str(vae / "checkpoints" / "last.ckpt")}, 1)
    dit = make_run(runs, "dit", {"net": SPARSE_DIT, "conditioner": {
        "_target_": "d3ds2.models.conditioner.ImageConditioner", "config": TINY_DINO}}, 2)
    sparse_vae = make_run(runs, "vae", {"net": SPARSE_VAE}, 3)
    images, refs = tmp_path / "images", tmp_path / "refs"
    images.mkdir()
    refs.mkdir()
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        rgba_image(images / f"{name}.png", colour)
        trimesh.creation.box((1.0, 0.8, 0.6)).export(refs / f"{name}.obj")
    (images / "broken.png").write_bytes(b"\x89PNG not an image")  # its generation crashes: a failed mesh
    trimesh.creation.box().export(refs / "broken.obj")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "-m", f"hydra.sweep.dir={sweep}", f"image_dir={images}",
           f"ref_dir={refs}", "n_points=2000", "thresholds=[0.05,0.1]", "generate.device=cpu",
           f"generate.ckpt.index_dit={index_dit}", f"generate.ckpt.vae_512={sparse_vae}",
           f"generate.ckpt.sparse_dit_512={dit},{tmp_path / 'no_such_run'}", "generate.guidance=3.0,5.0",
           "generate.steps=2", "generate.index_threshold=0.97", "generate.batch_size=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    with open(sweep / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    ok = [r for r in table if r["status"] == "ok"]
    bad = [r for r in table if r["status"] == "failed"]
    assert len(ok) == 2 and len(bad) == 2
    assert all("no_such_run" in r["overrides"] and "no checkpoint" in r["error"] for r in bad)
    assert {r["overrides"].split("guidance=")[1].split()[0] for r in ok} == {"3.0", "5.0"}
    assert all("image_dir=" not in r["overrides"] for r in table)  # only the sweep axes
    for r in ok:
        assert float(r["meshes"]) == 3 and float(r["evaluated"]) == 2 and float(r["failed"]) == 1
        assert float(r["fscore@0.1/mean_failed_as_0 n"]) == 3 and float(r["fscore@0.1/mean n"]) == 2
        f_ok, f_all = float(r["fscore@0.1/mean"]), float(r["fscore@0.1/mean_failed_as_0"])
        assert f_all == pytest.approx(f_ok * 2 / 3) and float(r["chamfer_l1/mean"]) > 0  # broken scores 0
        assert "sparse_dit_512=last.ckpt@" in r["checkpoints"] and "dense:2/" in r["sampler"]
    point = json.loads((sweep / ok[0]["point"] / "summary.json").read_text())
    assert point["protocol"]["name"] == "d3ds2" and len(point["checkpoints"]["sparse_dit_512"]["sha256"]) == 64
    assert point["sampler"]["sparse_512"]["guidance"] in (3.0, 5.0)
    assert sorted(p.name for p in (sweep / ok[0]["point"] / "meshes").iterdir()) == ["blue.glb", "red.glb"]
    md = (sweep / "sweep_summary.md").read_text()
    assert md.count("\n") == 6 and "(n=2)" in md and "(n=3)" in md and "failed" in md
    metrics_csv = (sweep / ok[0]["point"] / "metrics.csv").read_text()
    assert "broken" in metrics_csv and "generation failed" in metrics_csv
    png = (sweep / "sweep_summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_sweep_without_any_metric_exits_non_zero(tmp_path):
    from omegaconf import OmegaConf

    from d3ds2.eval.sweep import SweepSummary, read_points

    for i, overrides in enumerate((["generate.seed=0"], ["generate.seed=1"])):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"status": "failed", "error": "FileNotFoundError: x"}))
    points = read_points(tmp_path)  # point 1 left no summary.json (killed): failed, said so
    assert [p["status"] for p in points] == ["failed", "failed"] and "no summary.json" in points[1]["error"]
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit, match="every sweep point failed"):
        SweepSummary().on_multirun_end(config)
    table = (tmp_path / "sweep_summary.md").read_text()  # the table is written first
    assert "generate.seed=0" in table and "FileNotFoundError: x" in table and "killed" in table
