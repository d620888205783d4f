"""Modules that the DDP tests load by name inside the ranks that Lightning starts (``model._target_``)."""
from __future__ import annotations

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
