"""The Hydra + Lightning stack on the toy experiment: fit, exact resume, EMA, checkpoints, config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from d3ds2.checkpoint import load_net_weights
from d3ds2.training.checkpoint import atomic_torch_save
from d3ds2.training.runner import run_training
from d3ds2.training.toy import ToySparseNet
from train_helpers import CONFIGS, compose_train, run_composed



def _cfg(tmp_path: Path, *overrides: str):
    return compose_train("toy", tmp_path, *overrides)


_run = run_composed


def test_fit_then_exact_resume(tmp_path):
    straight = tmp_path / "straight"
    _run(_cfg(straight, "trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=6", "trainer.val_check_interval=6"))
    resumed = tmp_path / "resumed"
    _run(_cfg(resumed, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=6", "trainer.val_check_interval=6"))
    _run(_cfg(resumed, "trainer.max_steps=12", "ckpt_path=last", "callbacks.model_checkpoint.every_n_train_steps=6", "trainer.val_check_interval=6"))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, msg=f"weights differ after resume: {k}")
    for k, v in a["ema"].items():
        torch.testing.assert_close(b["ema"][k], v, msg=f"EMA differs after resume: {k}")
    # the EMA is a real average: it differs from the live weights after training
    assert any(not torch.equal(a["ema"][k], a["state_dict"]["net." + k]) for k in a["ema"])
    assert (resumed / "config_resolved.yaml").is_file()
    assert next((resumed / "csv").glob("version_*/metrics.csv")).read_text().count("train/loss") >= 1


def test_last_checkpoint_holds_the_final_step(tmp_path):
    """A run that stops between checkpoint intervals (max_steps or max_time) still ends with its final weights."""
    _run(_cfg(tmp_path, "trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=5",
              "trainer.val_check_interval=5"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    assert "ema" in last


def test_load_net_weights_reports_mismatch(tmp_path):
    net = ToySparseNet(width=8, depth=2)
    atomic_torch_save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "a.ckpt")
    load_net_weights(tmp_path / "a.ckpt", ToySparseNet(width=8, depth=2), prefer_ema=False)
    with pytest.raises(ValueError, match=r"shape mismatches .*layers\.0\.weight") as err:
        load_net_weights(tmp_path / "a.ckpt", ToySparseNet(width=4, depth=2))
    assert "missing" in str(err.value) and "another model config" in str(err.value)
    assert not list(tmp_path.glob(".*.tmp")), "atomic save left a temp file"


def test_unknown_config_key_is_rejected():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
            compose("train", overrides=["experiment=toy", "trainer.max_stepz=3"])
        with pytest.raises(ConfigCompositionException):
            compose("train", overrides=["experiment=does_not_exist"])


def test_missing_experiment_explains_itself(tmp_path):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match="experiment="):
        run_training(cfg)


def test_nonfinite_losses_are_skipped_then_stop(tmp_path):
    from d3ds2.training.toy import ToySparseRegression

    cfg = _cfg(tmp_path, "trainer.max_steps=10", "+model.max_consecutive_nonfinite=3", "model.optimizer.lr=1e30")
    with open_dict(cfg):
        cfg.model._target_ = "tests_nan_module.AlwaysNaN"
    import sys
    import types

    mod = types.ModuleType("tests_nan_module")

    class AlwaysNaN(ToySparseRegression):
        def __init__(self, net, optimizer, scheduler=None, max_consecutive_nonfinite=20):
            super().__init__(net, optimizer, scheduler)
            self.max_consecutive_nonfinite = max_consecutive_nonfinite

        def compute_loss(self, batch, stage):
            loss, terms, n = super().compute_loss(batch, stage)
            return loss * float("nan"), terms, n

    mod.AlwaysNaN = AlwaysNaN
    sys.modules["tests_nan_module"] = mod
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        _run(cfg)
