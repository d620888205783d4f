"""Data-parallel training through Lightning DDP: two CPU processes (gloo) running `train.py` as a user would."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _train_two_ranks(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """`train.py` under `trainer=ddp` on two CPU processes (gloo); fails the test on a crash or a hang."""
    cmd = [sys.executable, "train.py", f"paths.root_dir={tmp_path}", "run_name=ddp", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32", "logger=csv",
           "callbacks.progress_bar.refresh_rate=0", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_vae_tiny_trains_on_two_ranks(tmp_path):
    steps = 4
    done = _train_two_ranks(tmp_path, "experiment=vae_tiny", f"trainer.max_steps={steps}",
                            "trainer.val_check_interval=2")
    run = tmp_path / "logs" / "vae_tiny" / "ddp"
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # a second process joined
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    # one run directory for both ranks: rank 0 writes the config and the renders, validation is reduced
    assert (run / "config_resolved.yaml").is_file()
    assert sorted(p.name for p in run.rglob("val_renders/*.png")) == ["step_0000002.png", "step_0000004.png"]
    rows = [r for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("val/loss")]
    assert len(rows) == 2 and all(float(r["val/loss"]) > 0 for r in rows)


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_both(tmp_path):
    """Rank 1 alone sees NaN twice: both ranks skip those steps (no half all-reduce, no hang) and go on."""
    steps = 6
    _train_two_ranks(tmp_path, "experiment=toy", "model._target_=ddp_helpers.NaNOnRankOne",
                     f"trainer.max_steps={steps}", "trainer.val_check_interval=100", "trainer.log_every_n_steps=1")
    run = tmp_path / "logs" / "toy" / "ddp"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == steps
    adam_steps = {float(st["step"]) for st in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {steps - 2}  # the two NaN batches updated nothing (on rank 0 either)
    rows = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 2  # seen on rank 0
