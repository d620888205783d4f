"""``BaseModule``: the Lightning plumbing every d3ds2 model shares (optimiser, non-finite guard, logging).

Subclasses implement :meth:`compute_loss`; the wrapped ``net`` is a plain ``nn.Module`` (no Lightning).
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class BaseModule(L.LightningModule):
    """Args:
    net: the model being trained.
    optimizer: ``functools.partial`` of a torch optimiser taking the parameters (Hydra ``_partial_: true``).
    scheduler: optional partial of an LR scheduler taking the optimiser; stepped every training step.
    max_consecutive_nonfinite: stop with a clear error after this many non-finite losses in a row.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        max_consecutive_nonfinite: int = 20,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_streak = 0
        self.skipped_steps = 0
        self._step_start: float | None = None
        self._skip_update = False  # the last training step's loss was non-finite on some rank

    # -------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(total loss, named loss terms, number of tokens/voxels processed) for one batch."""
        raise NotImplementedError

    def _batch_size(self, batch: Any) -> int:
        return getattr(batch, "batch_size", 1)

    # -------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    @property
    def _distributed(self) -> bool:
        """Attached to a trainer with more than one process (DDP)."""
        return self._trainer is not None and self.trainer.world_size > 1

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss, terms, tokens = self.compute_loss(batch, "train")
        finite = bool(torch.isfinite(loss))
        if self._distributed:  # every rank skips together, or none does
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._skip_update = not finite
        bs = self._batch_size(batch)
        # every step logs its own loss and terms, NaN/inf included: no logger shows an earlier step's as its own
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=bs)
        if not finite:
            # The step counter still advances: Lightning 2.x counts global_step as optimizer_step calls (counted
            # after the hook whether or not it updated), and the step is also the batch count that data streams,
            # checkpoint intervals and schedules resume from; skipped updates are counted in skipped_steps.
            self.nonfinite_streak += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss (%s), step skipped (%d in a row)", self.global_step, loss.item(), self.nonfinite_streak)
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
            if self.nonfinite_streak >= self.max_consecutive_nonfinite:
                raise RuntimeError(
                    f"{self.nonfinite_streak} non-finite losses in a row (last at step {self.global_step}); "
                    "lower the learning rate, check the data for NaN/inf, or train in float32 (trainer.precision=32)"
                )
            if self._distributed:  # DDP needs a backward on every rank: zero gradients; optimizer_step skips the update
                return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return None
        self.nonfinite_streak = 0
        if self._step_start is not None:
            self.log("train/tokens_per_s", tokens / max(time.perf_counter() - self._step_start, 1e-9), batch_size=bs)
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, batch_size=bs)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, terms, _ = self.compute_loss(batch, "val")
        bs = self._batch_size(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in terms.items():  # NCCL reduces CUDA tensors only: a term made on the CPU moves first
            self.log(f"val/{name}", value.to(self.device), batch_size=bs, sync_dist=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """As Lightning's, except under DDP after a non-finite loss: the closure (forward, the zero backward,
        the all-reduce) runs on every rank, the update does not."""
        if not self._distributed:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()
        if not self._skip_update:
            optimizer.step(closure=lambda: None)  # clipping, hooks and the update on the gradients just made

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to write non-finite weights (live or EMA): raising here stops the run before Lightning writes
        the file, so ``last.ckpt`` and the best checkpoint keep the last finite weights."""
        for group in ("state_dict", "ema"):
            bad = [k for k, v in checkpoint.get(group, {}).items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise RuntimeError(
                    f"step {self.global_step}: the {'EMA ' if group == 'ema' else ''}weights are non-finite "
                    f"({len(bad)} tensors, e.g. {bad[0]}); checkpoint not written, the previous ones are kept. "
                    "Resume from them (ckpt_path=last) with a lower learning rate or trainer.precision=32")
        checkpoint["d3ds2"] = {"skipped_steps": self.skipped_steps, "net_class": type(self.net).__qualname__}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("d3ds2", {}).get("skipped_steps", 0)
