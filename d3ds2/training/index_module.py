"""Lightning modules of the index stage: the occupancy VAE and the dense flow DiT over its latents."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flow import TimestepSampler, drop_conditions, flow_matching_loss, interpolate, velocity_target
from ..models.conditioner import ImageConditioner
from ..models.dense_vae import DenseShapeVAE
from .base_module import BaseModule
from ..checkpoint import load_net_weights
from .dit_module import FrozenConditioner


def occupancy_grid(coords: torch.Tensor, batch_size: int, resolution: int) -> torch.Tensor:
    """Occupied cells (batch, x, y, z) [N, 4] -> dense occupancy [B, 1, R, R, R] float (0/1)."""
    if coords.shape[0] and int(coords[:, 1:].max()) >= resolution:
        raise ValueError(f"occupied cells reach {int(coords[:, 1:].max())}, beyond the index grid of {resolution}; "
                         "set model.resolution to the latent grid size (fine resolution / 8)")
    occ = torch.zeros(batch_size, 1, resolution, resolution, resolution, device=coords.device)
    c = coords.long()
    occ[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1.0
    return occ


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


class IndexVAEModule(BaseModule):
    """Trains the occupancy VAE on the occupied latent cells of each sample (grid ``resolution``^3):
    BCE + dice on the logits + kl_weight x KL (mean over latent elements)."""

    def __init__(self, net: DenseShapeVAE, optimizer: partial, scheduler: partial | None = None, resolution: int = 64,
                 kl_weight: float = 1e-3, dice_weight: float = 1.0) -> None:
        super().__init__(net, optimizer, scheduler)
        self.resolution, self.kl_weight, self.dice_weight = resolution, kl_weight, dice_weight

    def _batch_size(self, batch: dict) -> int:
        return batch["latent"].batch_size

    def compute_loss(self, batch: dict, stage: str):
        x = batch["latent"]
        occ = occupancy_grid(x.coords, x.batch_size, self.resolution)
        mean, logvar = self.net.encode(occ)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if stage == "train" else mean
        logits = self.net.decode(z).float()
        bce = F.binary_cross_entropy_with_logits(logits, occ)
        dice = dice_loss(logits, occ)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - logvar.float() - 1).mean()
        loss = bce + self.dice_weight * dice + self.kl_weight * kl
        with torch.no_grad():
            pred = logits > 0
            iou = (pred & (occ > 0)).sum() / ((pred | (occ > 0)).sum().clamp_min(1))
        return loss, {"bce": bce.detach(), "dice": dice.detach(), "kl": kl.detach(), "iou": iou}, x.num_voxels


class IndexFlowModule(BaseModule):
    """Trains the dense DiT on the (frozen) occupancy VAE's posterior means, conditioned on image tokens.

    vae / vae_ckpt: the trained occupancy VAE (config + checkpoint of ``experiment=index_vae``).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        vae: DenseShapeVAE,
        vae_ckpt: str | None,
        scheduler: partial | None = None,
        conditioner: ImageConditioner | None = None,
        timestep_sampler: TimestepSampler | None = None,
        p_uncond: float = 0.1,
        resolution: int = 64,
        init_from: str | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler)
        if vae_ckpt:
            load_net_weights(vae_ckpt, vae, prefer_ema=True)
        self.frozen = {"vae": vae.eval().requires_grad_(False)}
        self.cond = FrozenConditioner(conditioner)
        self.timestep_sampler = timestep_sampler or TimestepSampler()
        self.p_uncond, self.resolution = p_uncond, resolution
        if init_from:
            load_net_weights(init_from, self.net, prefer_ema=True)

    def _batch_size(self, batch: dict) -> int:
        return batch["latent"].batch_size

    def compute_loss(self, batch: dict, stage: str):
        x = batch["latent"]
        vae = self.frozen["vae"].to(self.device)
        with torch.no_grad():
            x0 = vae.encode(occupancy_grid(x.coords, x.batch_size, self.resolution))[0].float()
        noise = torch.randn_like(x0)
        t = self.timestep_sampler(x.batch_size, device=x0.device)
        xt = interpolate(x0, noise, t.view(-1, 1, 1, 1, 1))
        cond = self.cond.dense(batch, self.device)
        if stage == "train" and self.p_uncond > 0:
            cond, _ = drop_conditions(cond, self.p_uncond)
        pred = self.net(xt, t * 1000.0, cond)
        loss = flow_matching_loss(pred, velocity_target(x0, noise))
        return loss, {"mse": loss.detach()}, x0[0].numel() * x.batch_size // x0.shape[1]
