"""The schedule walk's resume logic across calls, with a real training stage (the toy experiment): a call
whose budget ends pauses the run; the next call skips the finished stages and continues the run from its
last.ckpt until it is finished."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("schedule_walk", ROOT / "benchmarks" / "schedule_walk.py")
schedule_walk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(schedule_walk)


class ToyWalk(schedule_walk.Walk):
    """Two stages: one that counts its runs, one real training run of experiment=toy."""

    max_steps = 100000

    def stages(self):
        def count():
            counter = self.work / "counted"
            counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
            return {"runs": int(counter.read_text())}

        def toy():
            cmd = self.common("toy", self.max_steps) + ["trainer.limit_val_batches=1"]
            return self.train("toy", "toy", cmd)

        return [("count", count), ("toy", toy)]


def test_walk_pauses_then_resumes_and_skips_finished_stages(tmp_path, monkeypatch):
    monkeypatch.setitem(schedule_walk.SIZES["tiny"], "val_every", 1000)
    work = tmp_path / "w"
    first = ToyWalk({"work": str(work), "size": "tiny", "device": "cpu", "budget_s": "150", "margin_s": "138"})
    first.walk()  # pause_after ~12 s of training: the toy run (100000 steps) pauses
    record = json.loads((work / "walk.json").read_text())
    assert record["stages"]["count"]["status"] == "done" and record["stages"]["toy"]["status"] == "unfinished"
    assert record["left"] == ["toy"]
    run = work / "logs" / "toy" / "walk"
    paused = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert paused > 0 and not (run / "finished.json").exists()

    ToyWalk.max_steps = paused + 3
    second = ToyWalk({"work": str(work), "device": "cpu"})  # no budget: runs to the end
    second.walk()
    record = json.loads((work / "walk.json").read_text())
    assert record["calls"] == 2 and record["left"] == []
    assert (work / "counted").read_text() == "1"  # the finished stage was skipped
    assert record["stages"]["toy"]["status"] == "done" and record["stages"]["toy"]["metrics"]["step"] == paused + 3
    assert len(record["stages"]["toy"]["commands"]) == 2  # the paused and the resuming command, both recorded
    assert "Restoring states from the checkpoint" in (work / "stage_logs" / "toy.log").read_text()


def test_walk_refuses_unknown_keys(tmp_path):
    with pytest.raises(SystemExit, match="unknown keys"):
        schedule_walk.Walk({"work": str(tmp_path), "sizes": "tiny"})


class PrepWalk(schedule_walk.Walk):
    """The walk's data stages only: corpus (given meshes) and data prep."""

    def stages(self):
        return [("corpus", self.corpus), ("prep", self.prep)]


def test_walk_holds_out_data_preps_val_split_and_vae_eval_reads_it(tmp_path):
    """One data folder: the corpus stage pins the held-out meshes (data prep's hashed rule, at least 2) in
    split.txt; data prep writes them to shards/val-*.tar and the rest to train-*.tar; vae_recon_eval reads the
    val split from the shards folder and scores exactly those meshes."""
    import subprocess
    import sys

    import trimesh

    from d3ds2.data.layout import shard_urls
    from d3ds2.data.mesh_sample import sample_key

    meshes = tmp_path / "in"
    meshes.mkdir()
    for i in range(4):
        trimesh.creation.box(extents=(1.0, 0.5 + 0.1 * i, 0.7)).export(meshes / f"box_{i}.obj")
    work = tmp_path / "w"
    PrepWalk({"work": str(work), "size": "tiny", "device": "cpu", "meshes": str(meshes), "prep_res": "[32]",
              "views": "0", "watertight": "32", "workers": "1"}).walk()
    record = json.loads((work / "walk.json").read_text())
    assert record["left"] == []
    held = sorted(line.split(" ", 1)[1] for line in (work / "split.txt").read_text().splitlines() if line.startswith("val "))
    assert len(held) >= 2 and record["stages"]["corpus"]["metrics"] == {"meshes": 4, "heldout": len(held)}
    assert record["stages"]["prep"]["metrics"]["splits"] == {"train": 4 - len(held), "val": len(held)}

    shards = work / "data" / "shards"
    assert shard_urls(str(shards), "train") and shard_urls(str(shards), "val")
    gt = tmp_path / "gt.npz"
    done = subprocess.run([sys.executable, "benchmarks/vae_recon_eval.py", "--ground-truth", "--shards", str(shards),
                           "--split", "val", "--resolution", "32", "--out", str(gt), "--recon", str(gt), "--meshes",
                           str(work / "meshes")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{") and '"key"' in x]
    assert sorted(r["source"] for r in rows) == held
    assert {r["key"] for r in rows} == {sample_key(str(work / "meshes" / name)) for name in held}
    assert min(r["fscore@0.01"] for r in rows) > 0.5  # the stored SDF of a box meshes back to the box
