"""Data-parallel training through Lightning DDP: two CPU processes (gloo) running `train.py` as a user would."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_vae_tiny_trains_on_two_ranks(tmp_path):
    steps = 4
    cmd = [sys.executable, "train.py", "experiment=vae_tiny", f"paths.root_dir={tmp_path}", "run_name=ddp",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32",
           f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "logger=csv",
           "callbacks.progress_bar.refresh_rate=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "logs" / "vae_tiny" / "ddp"
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # a second process joined
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    # one run directory for both ranks: rank 0 writes the config and the renders, validation is reduced
    assert (run / "config_resolved.yaml").is_file()
    assert sorted(p.name for p in run.rglob("val_renders/*.png")) == ["step_0000002.png", "step_0000004.png"]
    rows = [r for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("val/loss")]
    assert len(rows) == 2 and all(float(r["val/loss"]) > 0 for r in rows)
