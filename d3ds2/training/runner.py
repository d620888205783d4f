"""``run_training(cfg)``: everything ``train.py`` does, callable from tests and notebooks."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, newest_readable_checkpoint
from .config_check import check_config_types
from .pause import PauseAfter
from .plots import plot_metrics
from .stages import apply_chain, clear_finished_marker, write_finished_marker

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a config group (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last`` -> ``<output_dir>/checkpoints/last.ckpt`` if it exists (else a fresh start), or the newest
    readable checkpoint beside it when it is truncated or damaged (with a warning); paths checked."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            found = newest_readable_checkpoint(last)
            if found is None:
                raise RuntimeError(f"ckpt_path=last: {last} and every other checkpoint in {last.parent} are "
                                   "unreadable (see the warnings above); give ckpt_path=FILE or start a new run_name")
            return str(found)
        log.warning("ckpt_path=last but %s does not exist yet: starting from scratch", last)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; give a .ckpt file or 'last'")
    return str(ckpt_path)


def save_final_checkpoint(trainer: L.Trainer) -> None:
    """Write ``last.ckpt`` at the end of fit when the last save is older than the final step: a run stopped by
    ``max_time``, or whose ``max_steps`` is not a multiple of ``every_n_train_steps``, would otherwise leave
    an older ``last.ckpt`` for evaluation and resume."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "save_last", False) or cb.dirpath is None:
        return
    if getattr(cb, "_last_global_step_saved", -1) == trainer.global_step or trainer.global_step == 0:
        return
    trainer.save_checkpoint(str(Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"))


def plot_run_metrics(loggers: list) -> None:
    """``metrics.png`` beside each CSV logger's ``metrics.csv`` (the curves of the run so far)."""
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            lg.save()
            csv_path = Path(lg.log_dir) / "metrics.csv"
            if csv_path.is_file():
                plot_metrics(csv_path)


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data, model, callbacks, loggers and trainer from ``cfg``; fit and/or test.

    Returns the trainer's final callback metrics as floats.
    """
    if cfg.get("data") is None or cfg.get("model") is None:
        raise ValueError(
            "no data/model configured: pick an experiment, e.g. `python train.py experiment=vae_tiny` "
            "(the files in d3ds2/configs/experiment/ list them)"
        )
    check_config_types(cfg)  # a mistyped override fails here, before data and models are built
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    apply_chain(cfg)  # the earlier stages' checkpoints, before the config is saved
    if rank_zero_only.rank == 0:  # DDP ranks started by Lightning share the run directory
        run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra's own node is saved by hydra
        OmegaConf.save(run_cfg, output_dir / "config_resolved.yaml", resolve=True)

    log.info("data: %s", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("model: %s", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    pause = PauseAfter(cfg.pause_after) if cfg.get("pause_after") else None
    callbacks += [pause] if pause else []
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if cfg.get("train", True):
        if trainer.is_global_zero:
            clear_finished_marker(output_dir)  # a run that trains again is unfinished until it ends again
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), output_dir))
        save_final_checkpoint(trainer)
        if trainer.is_global_zero and not trainer.interrupted and not (pause and pause.paused):
            write_finished_marker(output_dir, task=cfg.get("task_name"), run_name=cfg.get("run_name"),
                                  global_step=trainer.global_step, max_steps=trainer.max_steps)
        if trainer.is_global_zero:
            plot_run_metrics(loggers)
    if cfg.get("test", False):
        trainer.test(model, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
