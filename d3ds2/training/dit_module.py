"""Lightning module of the sparse DiT: rectified-flow training on VAE latents with CFG dropout."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ..flow import TimestepSampler, drop_conditions, flow_matching_loss, interpolate, velocity_target
from ..models.conditioner import ImageConditioner, sparse_condition
from ..models.dit_layers import SparseCondition
from .base_module import BaseModule
from ..checkpoint import load_net_weights


def load_latent_stats(path: str | Path | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [C], std [C]) from a JSON written by data_prep/latent_stats.py; identity when path is None."""
    if path is None:
        return torch.zeros(channels), torch.ones(channels)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics {path} not found; run data_prep/latent_stats.py on the latent shards")
    stats = json.loads(path.read_text())
    mean, std = torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(f"{path}: statistics have {mean.numel()} channels, the model {channels}")
    return mean, std


class FrozenConditioner:
    """Holds the frozen image encoder outside the module's parameters (not trained, not checkpointed)."""

    def __init__(self, conditioner: ImageConditioner | None) -> None:
        self.encoder = conditioner

    def dense(self, batch: dict, device: torch.device) -> torch.Tensor:
        """Condition tokens [B, L, C]: pre-computed ``cond`` or DINOv2 on ``images``."""
        if "cond" in batch:
            return batch["cond"]
        if self.encoder is None:
            raise ValueError("the batch holds images but the model has no conditioner; set model.conditioner or pre-compute features")
        self.encoder.to(device)
        return self.encoder(batch["images"])

    def fg(self, batch: dict) -> torch.Tensor:
        """Foreground patch mask [B, P] of the batch's views."""
        return batch["cond_fg"] if "cond_fg" in batch else self.encoder.patch_mask(batch["images"][:, 3:])


class SparseFlowModule(BaseModule):
    """Args (beyond BaseModule's): conditioner (frozen DINOv2, needed when batches hold images),
    timestep_sampler, p_uncond (CFG condition dropout), latent_stats (JSON of per-channel mean/std),
    init_from (checkpoint of the previous progressive stage: its net/EMA weights initialise ``net``)."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        conditioner: ImageConditioner | None = None,
        timestep_sampler: TimestepSampler | None = None,
        p_uncond: float = 0.1,
        latent_stats: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler)
        self.cond = FrozenConditioner(conditioner)
        self.timestep_sampler = timestep_sampler or TimestepSampler()
        self.p_uncond = p_uncond
        mean, std = load_latent_stats(latent_stats, net.in_channels)
        self.register_buffer("latent_mean", mean)
        self.register_buffer("latent_std", std)
        if init_from:
            load_net_weights(init_from, self.net, prefer_ema=True)

    def _batch_size(self, batch: dict) -> int:
        return batch["latent"].batch_size

    def condition(self, batch: dict) -> torch.Tensor | SparseCondition:
        tokens = self.cond.dense(batch, self.device)
        return sparse_condition(tokens, self.cond.fg(batch)) if self.net.sparse_conditions else tokens

    def compute_loss(self, batch: dict, stage: str):
        x = batch["latent"]
        x0 = (x.feats - self.latent_mean) / self.latent_std
        noise = torch.randn_like(x0)
        t = self.timestep_sampler(x.batch_size, device=x0.device)
        xt = interpolate(x0, noise, t[x.batch_ids].unsqueeze(1))
        cond = self.condition(batch)
        if stage == "train" and self.p_uncond > 0:
            cond, _ = drop_conditions(cond, self.p_uncond)
        pred = self.net(x.replace(xt), t * 1000.0, cond).feats
        loss = flow_matching_loss(pred, velocity_target(x0, noise))
        return loss, {"mse": loss.detach()}, x.num_voxels
