"""Flow-matching loss."""
from __future__ import annotations

import torch


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error over all elements (float32); ``weight`` [rows] weighs rows (e.g. 1/tokens)."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1) if pred.dim() > 1 else (pred.float() - target.float()).pow(2)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum()
