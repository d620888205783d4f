"""Lightning modules of the index stage: the occupancy VAE and the dense flow DiT over its latents."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flow import TimestepSampler, drop_conditions, flow_matching_loss, guided_velocity, interpolate, null_condition, velocity_target
from ..models.conditioner import ImageConditioner
from ..models.dense_vae import DenseShapeVAE
from .base_module import BaseModule
from ..checkpoint import load_net_weights
from ..pipeline import StageSampling
from .dit_module import FrozenConditioner
from .pictures import PicturesAtValidation, image_tile, occupancy_projections, stack_rows


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


class IndexVAEModule(PicturesAtValidation, BaseModule):
    """Trains the occupancy VAE on the occupied latent cells of each sample (grid ``resolution``^3):
    BCE + dice on the logits + kl_weight x KL (mean over latent elements). Pictures: for the first
    ``picture_samples`` validation samples, the occupancy projections of the ground truth | reconstruction."""

    picture_tag = "val/occupancy"

    def __init__(self, net: DenseShapeVAE, optimizer: partial, scheduler: partial | None = None, resolution: int = 64,
                 kl_weight: float = 1e-3, dice_weight: float = 1.0, picture_samples: int = 2) -> None:
        super().__init__(net, optimizer, scheduler)
        self.resolution, self.kl_weight, self.dice_weight = resolution, kl_weight, dice_weight
        self.picture_samples = picture_samples

    def make_picture(self, batch: dict) -> np.ndarray:
        x = batch["latent"]
        k = min(self.picture_samples, x.batch_size)
        occ = occupancy_grid(x.coords, x.batch_size, self.resolution)[:k]
        pred = self.net.decode(self.net.encode(occ)[0]).float() > 0
        return stack_rows([np.concatenate([occupancy_projections(occ[i, 0]), occupancy_projections(pred[i, 0])], 1)
                           for i in range(k)])

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


class IndexFlowModule(PicturesAtValidation, BaseModule):
    """Trains the dense DiT on the (frozen) occupancy VAE's posterior means, conditioned on image tokens.

    vae / vae_ckpt: the trained occupancy VAE (config + checkpoint of ``experiment=index_vae``).
    Pictures: for the first ``picture_samples`` validation samples, [input view |] occupancy projections of
    the ground truth | a sample drawn with ``picture_sampling`` (steps, shift, guidance) and decoded.
    """

    picture_tag = "val/samples"

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
        picture_samples: int = 2,
        picture_sampling: dict | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler)
        if not vae_ckpt:
            raise ValueError("the index DiT trains on the latents of a trained occupancy VAE: train "
                             "`experiment=index_vae` first, or give vae_from=RUN_DIR|CKPT (model.vae_ckpt)")
        load_net_weights(vae_ckpt, vae, prefer_ema=True)
        self.frozen = {"vae": vae.eval().requires_grad_(False)}
        self.cond = FrozenConditioner(conditioner)
        self.timestep_sampler = timestep_sampler or TimestepSampler()
        self.p_uncond, self.resolution = p_uncond, resolution
        if init_from:
            load_net_weights(init_from, self.net, prefer_ema=True)
        self.picture_samples = picture_samples
        self.picture_sampling = StageSampling(**(picture_sampling or {"steps": 25}))

    def _batch_size(self, batch: dict) -> int:
        return batch["latent"].batch_size

    def make_picture(self, batch: dict) -> np.ndarray:
        x, vae = batch["latent"], self.frozen["vae"].to(self.device)
        k = min(self.picture_samples, x.batch_size)
        occ = occupancy_grid(x.coords, x.batch_size, self.resolution)[:k]
        cond = self.cond.dense(batch, self.device)[:k]
        r = self.net.resolution
        noise = torch.randn(k, self.net.in_channels, r, r, r, generator=torch.Generator().manual_seed(0)).to(self.device)

        def velocity(z, t, w):
            return guided_velocity(lambda zz, tt, cc: self.net(zz, tt, cc).float(), z, t, cond, null_condition(cond), w)

        z = self.picture_sampling.sampler().sample(velocity, noise, k)
        pred = vae.decode(z).float() > 0
        rows = []
        for i in range(k):
            tiles = [image_tile(batch["images"][i], 128)] if "images" in batch else []
            rows.append(np.concatenate([*tiles, occupancy_projections(occ[i, 0]), occupancy_projections(pred[i, 0])], 1))
        return stack_rows(rows)

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
