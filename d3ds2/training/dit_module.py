"""Lightning module of the sparse DiT: rectified-flow training on VAE latents with CFG dropout."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import load_net_weights
from ..flow import TimestepSampler, drop_conditions, flow_matching_loss, guided_velocity, interpolate, null_condition, velocity_target
from ..models.conditioner import ImageConditioner, sparse_condition
from ..models.dit_layers import SparseCondition
from ..pipeline import StageSampling, extract_meshes, load_model, resolve_run
from ..sparse import SparseTensor
from .base_module import BaseModule
from .pictures import PicturesAtValidation, image_tile, open3d_available, render_pair, stack_rows


def load_latent_stats(path: str | Path | None, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [C], std [C]) from the stats.json of a latents folder (``python -m data_prep.encode_latents`` or
    ``data_prep.latent_stats``); identity when path is None."""
    if path is None:
        return torch.zeros(channels), torch.ones(channels)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics {path} not found; run `python -m data_prep.latent_stats data=DATA resolution=R` on the latent shards")
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


def first_samples(batch: dict, k: int) -> dict:
    """The first ``k`` samples of a latent batch (latent, condition tokens / views)."""
    x = batch["latent"]
    keep = x.batch_ids < k
    out = {"latent": SparseTensor(x.feats[keep], x.coords[keep], k)}
    for name in ("cond", "cond_fg", "images"):
        if name in batch:
            out[name] = batch[name][:k]
    return out


class SparseFlowModule(PicturesAtValidation, BaseModule):
    """Args (beyond BaseModule's): conditioner (frozen DINOv2, needed when batches hold images),
    timestep_sampler, p_uncond (CFG condition dropout), latent_stats (JSON of per-channel mean/std),
    init_from (checkpoint of the previous progressive stage: its net/EMA weights initialise ``net``).

    Pictures: vae_ckpt (a checkpoint inside a VAE run, whose ``config_resolved.yaml`` builds the VAE; None:
    no pictures) decodes, for the first ``picture_samples`` validation samples, [input view |] the ground-truth
    latent | a latent sampled on the same cells with ``picture_sampling`` (steps, shift, guidance), as meshes
    at the fine ``resolution`` of the stage."""

    picture_tag = "val/samples"

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
        vae_ckpt: str | None = None,
        resolution: int | None = None,
        picture_samples: int = 2,
        picture_sampling: dict | None = None,
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
        self.frozen = {"vae": self._load_vae(vae_ckpt, resolution, picture_samples)}
        self.resolution = resolution
        self.picture_samples = picture_samples if self.frozen["vae"] is not None else 0
        self.picture_sampling = StageSampling(**(picture_sampling or {"steps": 25}))

    @staticmethod
    def _load_vae(vae_ckpt: str | None, resolution: int | None, picture_samples: int) -> nn.Module | None:
        """The frozen VAE of the pictures, built from its run's config (None when pictures are off)."""
        if not picture_samples or not vae_ckpt or not open3d_available("model.picture_samples"):
            return None
        if resolution is None:
            raise ValueError("model.resolution (the stage's fine resolution) is needed to draw the decoded samples; "
                             "set it, or model.picture_samples=0")
        cfg, ckpt = resolve_run(vae_ckpt)
        return load_model(cfg.model.net, ckpt)

    def make_picture(self, batch: dict) -> np.ndarray:
        vae = self.frozen["vae"].to(self.device)
        sub = first_samples(batch, min(self.picture_samples, batch["latent"].batch_size))
        x, k = sub["latent"], sub["latent"].batch_size
        cond = self.condition(sub)
        noise = torch.randn(x.feats.shape, generator=torch.Generator().manual_seed(0)).to(self.device)

        def velocity(feats, t, w):
            return guided_velocity(lambda xx, tt, cc: self.net(xx, tt, cc).feats.float(), x.replace(feats), t, cond,
                                   null_condition(cond), w)

        z = self.picture_sampling.sampler().sample(velocity, noise, k) * self.latent_std + self.latent_mean
        truth = extract_meshes(vae.decode(x.replace(x.feats.float())).sdf, self.resolution)
        drawn = extract_meshes(vae.decode(x.replace(z)).sdf, self.resolution)
        rows = []
        for i in range(k):
            tiles = [image_tile(sub["images"][i], 192)] if "images" in sub else []
            rows.append(np.concatenate([*tiles, render_pair([truth[i], drawn[i]])], 1))
        return stack_rows(rows)

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
