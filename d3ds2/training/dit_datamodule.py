"""The DiT / index data module over latent shards (format and batch stream: :mod:`d3ds2.data.latent_shards`)."""
from __future__ import annotations

import os

import lightning as L
from torch.utils.data import DataLoader

from ..data.latent_shards import LatentStream, check_encoder, latent_shard_urls
from ..data.layout import LATENT_ENCODER
from .stream_state import StreamStateMixin


class LatentDataModule(StreamStateMixin, L.LightningDataModule):
    """DiT data: ``train_shards`` / ``val_shards`` latent shard sources (a folder ``DATA/latents/R``, whose
    ``train-*.tar`` / ``val-*.tar`` are read; a glob; ``pipe:`` / ``http(s)://`` URLs; a list); batches bounded by
    ``batch_tokens``; ``cache``: keep the samples in memory after the first pass; ``shuffle_buffer``,
    ``resample``, ``max_skip_fraction``: see :class:`d3ds2.data.shards.ShardReader`. ``vae_ckpt``: the VAE
    checkpoint this stage decodes with; latents folders whose ``encoder.json`` names another VAE are refused.
    The training stream's position is saved in checkpoints (a resumed run reads what an uninterrupted one would)."""

    def __init__(self, train_shards, val_shards=None, batch_tokens: int = 32768, max_batch: int = 64,
                 max_tokens: int | None = None, num_workers: int = 0, seed: int = 0, cache: bool = False,
                 shuffle_buffer: int = 256, resample: bool = False, max_skip_fraction: float = 0.01,
                 vae_ckpt: str | None = None) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_tokens, self.max_batch, self.max_tokens = batch_tokens, max_batch, max_tokens
        self.num_workers, self.seed, self.cache = num_workers, seed, cache
        self.shuffle_buffer, self.resample, self.max_skip_fraction = shuffle_buffer, resample, max_skip_fraction
        self.vae_ckpt = vae_ckpt

    def setup(self, stage: str) -> None:
        if not self.vae_ckpt:
            return
        for spec in (self.train_shards, self.val_shards):
            if isinstance(spec, str) and os.path.isdir(spec):
                check_encoder(os.path.join(spec, LATENT_ENCODER), self.vae_ckpt, f"the latents in {spec}")

    def _loader(self, spec, train: bool) -> DataLoader:
        stream = LatentStream(latent_shard_urls(spec, "train" if train else "val"), self.batch_tokens, self.max_batch,
                              self.max_tokens, shuffle=train, loop=train, seed=self.seed,
                              view="random" if train else "first", buffer=self.shuffle_buffer, cache=self.cache,
                              resample=self.resample and train, max_skip_fraction=self.max_skip_fraction,
                              position=self.position if train else None, with_position=train)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_shards, False) if self.val_shards else []
