"""Modules and callbacks that subprocess tests load by name (``model._target_``, ``+callbacks.X._target_``)."""
from __future__ import annotations

import os
import signal

import lightning as L
import torch

from d3ds2.training.toy import ToySparseRegression


class NaNOnRankOne(ToySparseRegression):
    """The toy regression whose loss is NaN on rank 1 alone, at its second and third training batches."""

    def compute_loss(self, batch, stage):
        loss, terms, n = super().compute_loss(batch, stage)
        self.batches_seen = getattr(self, "batches_seen", 0) + (stage == "train")
        if stage == "train" and self.global_rank == 1 and self.batches_seen in (2, 3):
            loss = loss * torch.tensor(float("nan"))
        return loss, terms, n


class KillAtStep(L.Callback):
    """Ends its own process with SIGKILL when training is about to run step ``step`` (its checkpoint written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
