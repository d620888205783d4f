"""Training timestep distributions on (0, 1)."""
from __future__ import annotations

import torch


class TimestepSampler:
    """Draws t [B] in (0, 1): 'logit_normal' = sigmoid(N(mean, std)) (TRELLIS image configs: mean 1, std 1,
    biased towards noise) or 'uniform'."""

    KINDS = ("logit_normal", "uniform")

    def __init__(self, kind: str = "logit_normal", mean: float = 1.0, std: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"TimestepSampler: unknown kind {kind!r}; choose one of {self.KINDS}")
        if std <= 0:
            raise ValueError(f"TimestepSampler: std must be > 0, got {std}")
        self.kind, self.mean, self.std = kind, mean, std

    def __call__(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        z = torch.randn(batch_size, device=device, generator=generator) * self.std + self.mean
        return torch.sigmoid(z)
