"""Chained stages: the finished marker, the chain finder (latest finished run, explicit run, none), the
prefix hook, the data resolution check, pausing and resuming, the warm-up schedule (CPU, seconds)."""
from __future__ import annotations

import csv
import io
import json
import tarfile
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from d3ds2.training import stages
from d3ds2.training.schedules import lr_factor, warmup_schedule
from d3ds2.training.stages import (StageError, check_resolutions, latest_finished_run, register_checkpoint_resolver,
                                   resolve_checkpoint, write_finished_marker)
from train_helpers import compose_train, run_composed


def fake_run(log_dir, task: str, name: str, finished: bool, finished_at: float | None = None):
    run = log_dir / task / name
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    if finished:
        write_finished_marker(run, task=task, global_step=10)
        if finished_at is not None:  # pin the order independently of the clock's resolution
            info = json.loads((run / "finished.json").read_text())
            (run / "finished.json").write_text(json.dumps({**info, "finished_at": finished_at}))
    return run


def test_chain_finder_latest_explicit_none(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(StageError, match=r"python train.py experiment=dit_256"):
        resolve_checkpoint(None, logs, "dit_256", "experiment dit_384")
    old = fake_run(logs, "dit_256", "2026-01-01_00-00-00", True, finished_at=100.0)
    new = fake_run(logs, "dit_256", "2026-01-02_00-00-00", True, finished_at=200.0)
    fake_run(logs, "dit_256", "2026-01-03_00-00-00", False)  # started later, never finished: not a candidate
    assert latest_finished_run(logs, "dit_256") == new
    assert resolve_checkpoint(None, logs, "dit_256") == str(new / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint("latest", logs, "dit_256") == str(new / "checkpoints" / "last.ckpt")
    # an explicit run or checkpoint wins over the latest
    assert resolve_checkpoint(str(old), logs, "dit_256") == str(old / "checkpoints" / "last.ckpt")
    assert resolve_checkpoint(str(old / "checkpoints" / "last.ckpt"), logs) == str(old / "checkpoints" / "last.ckpt")
    with pytest.raises(StageError, match="neither a run directory nor a checkpoint"):
        resolve_checkpoint(str(tmp_path / "missing"), logs, "dit_256")
    # a task with only unfinished runs: the error names them and how to resume
    fake_run(logs, "vae_multires", "crashed", False)
    with pytest.raises(StageError, match="crashed.*ckpt_path=last"):
        resolve_checkpoint(None, logs, "vae_multires")


def test_prefix_resolvers_dispatch(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "_RESOLVERS", {})
    with pytest.raises(StageError, match="unknown checkpoint source 'official'"):
        resolve_checkpoint("official:/models/direct3d", tmp_path)
    seen = []
    register_checkpoint_resolver("official", lambda rest: seen.append(rest) or f"/converted/{rest.strip('/')}.ckpt")
    assert resolve_checkpoint("official:/models/direct3d", tmp_path) == "/converted/models/direct3d.ckpt"
    assert seen == ["/models/direct3d"]


def _data_shard(path, resolutions):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in ("k0", "k1"):
            for name in ["meta.json", *[f"sdf{r}.npz" for r in resolutions]]:
                data = b"{}"
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_resolution_check_names_what_to_prepare(tmp_path):
    shard = _data_shard(tmp_path / "shards" / "train-rank000-00000.tar", [256, 512])
    assert check_resolutions([256, 384, 512], [shard]) == [256, 512]  # 384: resampled from 512, as the paper
    with pytest.raises(StageError, match=r"prepared at \[256, 512\].*resolutions=\[256,512,1024\]"):
        check_resolutions([1024], [shard], "experiment vae_finetune_1024")
    # through the training config: the VAE stage is refused before anything is built
    for source in (f"{tmp_path}/shards/*.tar", f"{tmp_path}/shards"):  # a glob, and a data folder (its train split)
        cfg = compose_train("vae_tiny", tmp_path / "run", f"data.train_shards={source}", "data.resolutions=[256,1024]")
        with pytest.raises(StageError, match="resolutions=\\[256,512,1024\\]"):
            run_composed(cfg)


def test_stages_chain_through_train_py(tmp_path):
    """vae_tiny run 1 finishes -> a second run with chain.init=vae_tiny starts from run 1's EMA weights, and
    its config records which checkpoint it used; with no finished run of the named task it stops clearly."""
    common = [f"paths.log_dir={tmp_path}/logs", "trainer.max_steps=2", "trainer.val_check_interval=1000",
              "model.render_meshes=0", "data.resolutions=[16]", "data.val_resolution=16"]
    first = tmp_path / "logs" / "vae_tiny" / "first"
    run_composed(compose_train("vae_tiny", first, *common))
    assert json.loads((first / "finished.json").read_text())["global_step"] == 2
    second = tmp_path / "logs" / "vae_tiny" / "second"
    run_composed(compose_train("vae_tiny", second, *common, "chain.init=vae_tiny", "trainer.max_steps=0"))
    resolved = OmegaConf.load(second / "config_resolved.yaml")
    assert resolved.model.init_from == str(first / "checkpoints" / "last.ckpt")
    assert resolved.chain.resolved["model.init_from"] == resolved.model.init_from
    with pytest.raises(StageError, match="experiment=vae_multires"):
        run_composed(compose_train("vae_tiny", tmp_path / "third", *common, "chain.init=vae_multires"))
    # init_from=none: a fresh start although the experiment names a previous stage
    run_composed(compose_train("vae_tiny", tmp_path / "fourth", *common, "chain.init=vae_multires", "init_from=none",
                               "trainer.max_steps=0"))


def test_pause_then_resume_finishes(tmp_path):
    """pause_after ends the process early with last.ckpt and no marker; ckpt_path=last finishes the run."""
    run = tmp_path / "run"
    common = ["trainer.max_steps=6", "trainer.val_check_interval=100", "callbacks.model_checkpoint.every_n_train_steps=100",
              "callbacks.model_checkpoint.monitor=null"]
    run_composed(compose_train("toy", run, *common, "pause_after=1e-6"))
    assert not (run / "finished.json").exists()
    paused = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 1 <= paused < 6
    run_composed(compose_train("toy", run, *common, "ckpt_path=last"))
    marker = json.loads((run / "finished.json").read_text())
    assert marker["global_step"] == 6 and marker["max_steps"] == 6


def test_warmup_schedule_values():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 14, 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 4, "cosine", 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, 4, "linear", 14) == pytest.approx(0.0) and lr_factor(99, 4, "linear", 14) == 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_schedule(opt, 10, "cosine", None)
    with pytest.raises(ValueError, match="decay"):
        warmup_schedule(opt, 10, "exp")


def test_warmup_schedule_drives_the_optimiser(tmp_path):
    """The configured scheduler is stepped every optimiser step by the Lightning module (logged lr)."""
    run = tmp_path / "run"
    run_composed(compose_train("toy", run, "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                               "trainer.val_check_interval=100", "+scheduler@model.scheduler=warmup_constant",
                               "model.scheduler.warmup_steps=4"))
    rows = [r for r in csv.DictReader(open(next(run.rglob("metrics.csv")))) if r.get("lr-AdamW")]
    lrs = [float(r["lr-AdamW"]) for r in rows][:6]
    np.testing.assert_allclose(lrs, [3e-3 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)], rtol=1e-6)
    assert (run / "csv" / "version_0" / "metrics.png").is_file()


def test_official_release_prefix_is_resolved_and_checked(tmp_path):
    """``init_from=official:DIR[#section]`` passes through to the release loader; a missing folder says so."""
    from d3ds2.training.stages import StageError, resolve_checkpoint

    (tmp_path / "release").mkdir()
    spec = f"official:{tmp_path / 'release'}#sparse_512"
    assert resolve_checkpoint(spec, tmp_path / "logs") == spec
    with pytest.raises(StageError, match="not a folder"):
        resolve_checkpoint(f"official:{tmp_path / 'missing'}", tmp_path / "logs")


def test_an_explicit_model_checkpoint_is_kept(tmp_path):
    """``model.init_from=...`` given on the command line (the official fine-tuning recipe) is used as it is; without
    it, the chained stage looks for the latest finished run and says when there is none."""
    from d3ds2.training.stages import apply_chain

    given = compose_train("vae_tiny", tmp_path / "a", "chain.init=vae_tiny", f"model.init_from={tmp_path}/w.ckpt")
    assert apply_chain(given) == {} and given.model.init_from == f"{tmp_path}/w.ckpt"
    with pytest.raises(StageError, match="vae_tiny"):
        apply_chain(compose_train("vae_tiny", tmp_path / "b", "chain.init=vae_tiny"))
