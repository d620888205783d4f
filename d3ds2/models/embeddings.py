"""Parameter-free sinusoidal embeddings shared by the VAE and the DiTs."""
from __future__ import annotations

import torch
import torch.nn as nn


class AbsolutePositionEmbedder(nn.Module):
    """Sinusoidal embedding of D-dimensional positions into ``channels`` features.

    Per axis a, ``freq_dim = channels // D // 2`` frequencies f_i = 10000^(-i / freq_dim); the layout is
    [axis 0: sin(p_0 f), cos(p_0 f)], [axis 1: ...], ..., then zeros up to ``channels`` (the official
    Direct3D-S2 layout, so converted checkpoints see the same features).
    """

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels, self.in_channels = channels, in_channels
        self.freq_dim = channels // in_channels // 2
        freqs = torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim
        self.register_buffer("freqs", 1.0 / (10000**freqs), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """pos: [N, D] (any real dtype) -> [N, channels] float32."""
        if pos.shape[-1] != self.in_channels:
            raise ValueError(f"expected positions with {self.in_channels} coordinates, got {pos.shape[-1]}")
        angles = pos.float().unsqueeze(-1) * self.freqs  # [N, D, F]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(pos.shape[0], -1)
        pad = self.channels - emb.shape[1]
        return torch.nn.functional.pad(emb, (0, pad)) if pad else emb
