"""Compose a Hydra training config for tests and run it (shared by the training tests)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from d3ds2.training.runner import run_training

CONFIGS = str(Path(__file__).resolve().parents[1] / "d3ds2" / "configs")


def compose_train(experiment: str, output_dir: Path, *overrides: str):
    """d3ds2/configs/train.yaml with ``experiment``, CSV logging, no progress bar, outputs in ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "logger=csv", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.callbacks.pop("progress_bar")
        cfg.trainer.enable_progress_bar = False
    return cfg


def run_composed(cfg):
    HydraConfig.instance().set_config(cfg)
    return run_training(cfg)
