"""Diffusion timestep embedding shared by the sparse and dense DiTs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t [B] (0..1000 scale) -> [B, dim] float32, laid out [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """t [B] on the 0..1000 scale -> [B, hidden]: sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 1:
            raise ValueError(f"TimestepEmbedder: timesteps must have shape [B], got {tuple(t.shape)}")
        feats = timestep_features(t, self.frequency_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
