"""Hostile inputs to checkpoints and configs (issue 28): crafted pickles at every user-facing load, safetensors
export, a truncated last.ckpt, non-finite steps and weights, checkpoint file modes, mistyped overrides."""
from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from d3ds2.checkpoint import TRUST_PICKLE_ENV, export_safetensors, load_checkpoint, load_net_weights
from d3ds2.training.toy import ToySparseNet, ToySparseRegression
from train_helpers import compose_train, run_composed

ROOT = Path(__file__).resolve().parents[1]


class _RunsShellCommand:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path: Path, marker: Path, net: torch.nn.Module | None = None) -> Path:
    """A checkpoint with real weights (so only the key check would reject it) and a shell command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"net.{k}": v for k, v in (net.state_dict() if net is not None else {}).items()}
    torch.save({"state_dict": state, "payload": _RunsShellCommand(marker)}, path)
    return path


def assert_refused(err: str, ckpt: Path, marker: Path) -> None:
    assert not marker.exists(), "the crafted checkpoint ran its command"
    assert str(ckpt) in err and TRUST_PICKLE_ENV in err, err[-2000:]


def _subprocess(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != TRUST_PICKLE_ENV} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# ------------------------------------------------------------------------------------------------ item 1
def test_crafted_pickle_runs_only_with_the_opt_in(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    ckpt = crafted_checkpoint(tmp_path / "evil.ckpt", marker, ToySparseNet(4, 1))
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(ckpt)
    assert_refused(str(err.value), ckpt, marker)
    assert "system" in str(err.value)  # names what was refused
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")  # the opt-in: the file really is hostile
    load_checkpoint(ckpt)
    assert marker.exists()


def test_crafted_pickle_refused_by_every_cli(tmp_path):
    """inference.py, python -m d3ds2.vae command=reconstruct, python -m data_prep.encode_latents, in fresh
    processes."""
    from test_inference import INDEX_DIT, INDEX_VAE, SPARSE_VAE, rgba_image

    marker = tmp_path / "pwned"
    runs = {}
    for name, model in (("index_dit", {"net": INDEX_DIT, "vae": INDEX_VAE}), ("vae", {"net": SPARSE_VAE})):
        run = tmp_path / name
        crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker, instantiate(model["net"]))
        (run / "config_resolved.yaml").write_text(yaml.safe_dump({"model": model, "data": {"sdf_scale": 8.0, "val_resolution": 64}}))
        runs[name] = run
    image = rgba_image(tmp_path / "view.png", (30, 160, 30))
    calls = {
        "inference": [str(ROOT / "inference.py"), f"image={image}", f"out={tmp_path / 'm.glb'}", "device=cpu",
                      f"ckpt.index_dit={runs['index_dit']}", f"ckpt.sparse_dit_512={runs['vae']}", f"ckpt.vae_512={runs['vae']}"],
        "vae reconstruct": ["-m", "d3ds2.vae", "command=reconstruct", f"input={tmp_path / 'any.obj'}",
                            f"ckpt={runs['vae'] / 'checkpoints' / 'last.ckpt'}"],
        "encode_latents": ["-m", "data_prep.encode_latents", f"data={tmp_path}", f"out={tmp_path / 'lat'}",
                           "resolution=64", f"vae={runs['vae']}"],
    }
    for name, cmd in calls.items():
        res = _subprocess(cmd, tmp_path)
        assert res.returncode != 0, name
        assert_refused(res.stderr, runs["index_dit" if name == "inference" else "vae"] / "checkpoints" / "last.ckpt", marker)


def test_crafted_pickle_refused_by_init_from_vae_ckpt_and_resume(tmp_path):
    cfg = compose_train("index_dit_tiny", tmp_path / "cfg", "model.vae_ckpt=null")
    marker = tmp_path / "pwned"
    vae_ckpt = crafted_checkpoint(tmp_path / "vae.ckpt", marker, instantiate(cfg.model.vae))
    init = crafted_checkpoint(tmp_path / "init.ckpt", marker, instantiate(cfg.model.net))
    good_vae = tmp_path / "good_vae.ckpt"  # a plain state dict: the index DiT needs a trained VAE to start
    torch.save(instantiate(cfg.model.vae).state_dict(), good_vae)
    for key, ckpt in (("vae_ckpt", vae_ckpt), ("init_from", init)):
        model_cfg = OmegaConf.merge(cfg.model, {"vae_ckpt": str(good_vae)}, {key: str(ckpt)})
        with pytest.raises(Exception) as err:  # Hydra wraps the loader's RuntimeError
            instantiate(model_cfg)
        assert_refused(str(err.value), ckpt, marker)
    # Lightning's own resume load (ckpt_path=FILE) goes through the same loader
    resume = crafted_checkpoint(tmp_path / "resume.ckpt", marker, ToySparseNet(16, 3))
    with pytest.raises(RuntimeError) as err:
        run_composed(compose_train("toy", tmp_path / "run", "trainer.max_steps=2", f"ckpt_path={resume}"))
    assert_refused(str(err.value), resume, marker)


def _toy_run(out: Path, *overrides: str):
    return run_composed(compose_train("toy", out, "callbacks.model_checkpoint.every_n_train_steps=2",
                                      "trainer.val_check_interval=2", *overrides))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    _toy_run(out, "trainer.max_steps=4")
    return out


def test_own_checkpoints_load_weights_only_and_export_to_safetensors(toy_run, tmp_path):
    last = toy_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # no allowlist extension needed for our own checkpoints
    assert ckpt["global_step"] == 4
    out = tmp_path / "w.safetensors"
    res = _subprocess(["-m", "d3ds2.export_weights", f"ckpt={last}", f"out={out}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == "d3ds2-state-dict" and f.metadata()["ema"] == "true"
    # round trip: the exported weights are the checkpoint's EMA weights, through the same loader
    net = load_net_weights(out, ToySparseNet(16, 3))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ckpt["ema"][k].to(v.dtype), rtol=0, atol=0)
    live = export_safetensors(last, tmp_path / "live.safetensors", prefer_ema=False)
    net = load_net_weights(live, ToySparseNet(16, 3), prefer_ema=False)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][f"net.{k}"], rtol=0, atol=0)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="truncated or damaged"):
        load_net_weights(truncated, ToySparseNet(16, 3))


# ------------------------------------------------------------------------------------------------ item 5
def test_checkpoint_files_get_the_usual_mode(toy_run):
    mask = os.umask(0o022)
    os.umask(mask)
    for p in (toy_run / "checkpoints").glob("*.ckpt"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def test_truncated_last_ckpt_falls_back_to_the_newest_readable(tmp_path, caplog):
    _toy_run(tmp_path, "trainer.max_steps=4", "callbacks.model_checkpoint.monitor=null", "callbacks.model_checkpoint.save_top_k=-1")
    ckpts = tmp_path / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    os.utime(ckpts / "step_0000002.ckpt", (1, 1))  # older than step 4: the newest readable is step 4
    with caplog.at_level(logging.WARNING):
        _toy_run(tmp_path, "trainer.max_steps=6", "ckpt_path=last", "callbacks.model_checkpoint.monitor=null",
                 "callbacks.model_checkpoint.save_top_k=-1")
    assert any("last.ckpt is unreadable: resuming from" in r.getMessage() and "step_0000004.ckpt" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.load(last, weights_only=True)["global_step"] == 6
    rows = list(csv.DictReader(next(tmp_path.glob("csv/version_1/metrics.csv")).open()))
    assert min(int(r["step"]) for r in rows if r.get("train/loss")) >= 4  # resumed at step 4, not from scratch


class _NaNAt(ToySparseRegression):
    """The toy task whose loss is NaN at ``nan_steps``; from ``blow_up_at`` on, the weights are made inf."""

    nan_steps: tuple[int, ...] = ()
    blow_up_at: int | None = None

    def compute_loss(self, batch, stage):
        if stage == "train" and self.blow_up_at is not None and self.global_step >= self.blow_up_at:
            with torch.no_grad():
                next(self.net.parameters()).fill_(math.inf)
        loss, terms, n = super().compute_loss(batch, stage)
        if stage == "train" and self.global_step in self.nan_steps:
            loss = loss * math.nan
        return loss, terms, n


def _run_module(tmp_path: Path, cls: type, *overrides: str):
    import types

    mod = types.ModuleType("tests_reliability_modules")
    mod.Module = cls
    sys.modules[mod.__name__] = mod
    cfg = compose_train("toy", tmp_path, "trainer.log_every_n_steps=1", *overrides)
    with open_dict(cfg):
        cfg.model._target_ = "tests_reliability_modules.Module"
    return run_composed(cfg)


def test_nonfinite_step_logs_nan(tmp_path):
    cls = type("NaNAt3", (_NaNAt,), {"nan_steps": (3,)})
    _run_module(tmp_path, cls, "trainer.max_steps=5")
    rows = {int(r["step"]): r for r in csv.DictReader(next(tmp_path.glob("csv/version_*/metrics.csv")).open())
            if r.get("train/loss")}
    assert math.isnan(float(rows[3]["train/loss"])), rows[3]
    assert all(math.isfinite(float(rows[s]["train/loss"])) for s in (2, 4))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["d3ds2"]["skipped_steps"] == 1 and ckpt["global_step"] == 5  # the step counts (see base_module)


def test_nonfinite_weights_are_never_saved(tmp_path):
    cls = type("BlowUpAt3", (_NaNAt,), {"blow_up_at": 3})
    with pytest.raises(RuntimeError, match="weights are non-finite"):
        _run_module(tmp_path, cls, "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2",
                    "trainer.val_check_interval=2")
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert saved, "the checkpoint of step 2 (finite) should exist"
    for p in saved:
        ckpt = torch.load(p, weights_only=True)
        assert ckpt["global_step"] == 2, p
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()), p


# ------------------------------------------------------------------------------------------------ item 7
def test_mistyped_override_names_the_key_before_building(tmp_path):
    cfg = compose_train("toy", tmp_path, "trainer.max_steps=abc")
    with pytest.raises(ValueError, match=r"trainer\.max_steps='abc'.*expects max_steps: int"):
        run_composed(cfg)
    assert not (tmp_path / "config_resolved.yaml").exists()  # nothing was set up before the check


def test_killed_save_keeps_the_previous_checkpoint(tmp_path):
    """A real process killed by SIGKILL while it writes a large checkpoint over an existing one."""
    import signal
    import time

    from d3ds2.training.checkpoint import atomic_torch_save

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(4)}, target)
    code = ("import torch; from d3ds2.training.checkpoint import atomic_torch_save; "
            f"atomic_torch_save({{'step': 2, 'w': torch.ones(50_000_000)}}, {str(target)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        end = time.monotonic() + 120
        while not list(tmp_path.glob(".last.ckpt.*.tmp")) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before the kill: nothing was tested"
    assert torch.load(target, weights_only=True)["step"] == 1
