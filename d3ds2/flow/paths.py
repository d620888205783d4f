"""The rectified-flow path between data (t = 0) and Gaussian noise (t = 1)."""
from __future__ import annotations

import torch


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; t broadcasts against x0 (e.g. [N, 1] per token)."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = noise - x0, the regression target of the model."""
    return noise - x0
