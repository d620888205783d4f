"""Learning-rate schedules, as ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimiser step."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup_steps: int, decay: str = "constant", total_steps: int | None = None,
              final_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps: linear warm-up from 1/warmup to 1
    over ``warmup_steps``, then ``constant``, or ``cosine`` / ``linear`` decay to ``final_factor`` at
    ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return final_factor + (1.0 - final_factor) * shape


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = 1000, decay: str = "constant",
                    total_steps: int | None = None, final_factor: float = 0.0) -> LambdaLR:
    """Linear warm-up then ``decay`` (see :func:`lr_factor`); configs: ``model.scheduler`` with ``_partial_``."""
    if decay not in DECAYS:
        raise ValueError(f"model.scheduler.decay={decay!r}: choose one of {DECAYS}")
    if warmup_steps < 0:
        raise ValueError(f"model.scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"model.scheduler.decay={decay} needs total_steps > warmup_steps ({warmup_steps}), got "
                         f"{total_steps}; it follows trainer.max_steps unless set")
    if not 0.0 <= final_factor <= 1.0:
        raise ValueError(f"model.scheduler.final_factor must be in [0, 1], got {final_factor}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, decay, total_steps, final_factor))
