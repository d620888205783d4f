"""The launch scripts' command lines on the CPU with 2 gloo processes: scripts/slurm/train.sbatch (its srun
line run by a local srun that starts the tasks with SLURM's per-task variables) pauses a run;
scripts/torchrun_node.sh (real torchrun) resumes the same run folder and finishes it."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU = ["experiment=toy", "trainer.accelerator=cpu", "trainer.precision=32", "logger=csv",
       "callbacks.progress_bar.refresh_rate=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
       "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=100"]

# srun as a job step on one node: NTASKS copies of the command, each with its task's SLURM variables
LOCAL_SRUN = """#!/usr/bin/env bash
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.mark.slow
def test_sbatch_pauses_and_torchrun_resumes_the_run(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    base.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT), RUN_NAME="walk")
    run = tmp_path / "logs" / "toy" / "walk"

    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text(LOCAL_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    slurm = {**base, "PATH": f"{srun.parent}{os.pathsep}{base['PATH']}", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NAME": "d3ds2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_SUBMIT_DIR": str(ROOT),
             "MASTER_PORT": str(_free_port()), "PAUSE_AFTER": "1e-6"}
    done = _run(["bash", "scripts/slurm/train.sbatch", f"paths.root_dir={tmp_path}", *CPU], slurm)
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr  # the second task joined the process group
    paused = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= paused < 4 and not (run / "finished.json").exists()

    done = _run(["bash", "scripts/torchrun_node.sh", f"paths.root_dir={tmp_path}", *CPU], {**base, "NPROC": "2"})
    assert "GLOBAL_RANK: 1" in done.stdout + done.stderr
    marker = json.loads((run / "finished.json").read_text())
    assert marker["global_step"] == 4 and marker["run_name"] == "walk"
    assert "Restoring states from the checkpoint" in done.stdout + done.stderr
