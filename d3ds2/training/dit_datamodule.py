"""Latent shards (what the DiTs train on) and their token-budget data module.

A latent shard is a tar file of samples, each with the entries named in ``LATENT_KEYS``:
  ``{key}.latent.npz``  coords int16 [M, 3] occupied latent cells (fine resolution R / 8), feats float16
                         [M, C] posterior means of the sparse SDF VAE, ``resolution`` = R
  ``{key}.cond.npz``    (optional) tokens float16 [V, L, C] pre-computed DINOv2 features of V views, fg bool
                         [V, P] foreground patch mask of each view
  ``{key}.views.npz``   (optional) images uint8 [V, S, S, 4] preprocessed views (RGB on white + mask) when the
                         condition is computed on the fly
``data_prep/encode_latents.py`` writes them; :func:`write_latent_shard` is atomic.
"""
from __future__ import annotations

import io
import os
import random
import tarfile
from glob import glob
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..sparse import SparseTensor

LATENT_KEYS = ("latent", "cond", "views")


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_latent_shard(path: str | os.PathLike, samples: list[dict]) -> None:
    """Write samples {key, coords [M,3], feats [M,C], resolution, tokens?, fg?, images?} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w") as tar:
        for s in samples:
            entries = {"latent": _npz_bytes(coords=np.asarray(s["coords"], np.int16), feats=np.asarray(s["feats"], np.float16),
                                            resolution=np.int32(s["resolution"]))}
            if s.get("tokens") is not None:
                entries["cond"] = _npz_bytes(tokens=np.asarray(s["tokens"], np.float16), fg=np.asarray(s["fg"], bool))
            if s.get("images") is not None:
                entries["views"] = _npz_bytes(images=np.asarray(s["images"], np.uint8))
            for name, data in entries.items():
                info = tarfile.TarInfo(f"{s['key']}.{name}.npz")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def read_latent_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Yield samples {key, coords, feats, resolution[, tokens, fg][, images]} (numpy) of one shard."""
    current: dict | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, name, _ = member.name.rsplit(".", 2)
            if name not in LATENT_KEYS:
                raise ValueError(f"{path}: unknown entry {member.name}; expected one of {LATENT_KEYS}")
            if current is not None and current["key"] != key:
                yield current
                current = None
            current = current or {"key": key}
            with np.load(io.BytesIO(tar.extractfile(member).read())) as z:
                current.update({k: z[k] for k in z.files})
    if current is not None:
        yield current


def expand_shards(spec: str | list[str], hint: str = "run data_prep/encode_latents.py first") -> list[str]:
    """Glob pattern(s) -> sorted shard paths; a clear error when none match."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = sorted(p for pat in patterns for p in glob(str(pat)))
    if not paths:
        raise FileNotFoundError(f"no shards match {patterns}; {hint}")
    return paths


def _reader_slot() -> tuple[int, int]:
    """(index, count) of this data reader over DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


def collate_latents(samples: list[dict], view: str = "random", rng: random.Random | None = None) -> dict:
    """Samples -> batch dict: latent SparseTensor [N, C] (float32), and per sample one view's condition:
    cond [B, L, C] + cond_fg [B, P] (pre-computed) or images [B, 4, S, S] float in [0, 1]."""
    rng = rng or random
    feats = [torch.from_numpy(s["feats"].astype(np.float32)) for s in samples]
    coords = [torch.from_numpy(s["coords"].astype(np.int32)) for s in samples]
    batch: dict = {"latent": SparseTensor.from_samples(feats, coords), "keys": [s["key"] for s in samples]}
    if all("tokens" in s for s in samples):
        idx = [rng.randrange(len(s["tokens"])) if view == "random" else 0 for s in samples]
        batch["cond"] = torch.stack([torch.from_numpy(s["tokens"][i].astype(np.float32)) for s, i in zip(samples, idx)])
        batch["cond_fg"] = torch.stack([torch.from_numpy(s["fg"][i]) for s, i in zip(samples, idx)])
    elif all("images" in s for s in samples):
        idx = [rng.randrange(len(s["images"])) if view == "random" else 0 for s in samples]
        imgs = np.stack([s["images"][i] for s, i in zip(samples, idx)])
        batch["images"] = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    else:
        raise ValueError("every sample needs a condition: pre-computed tokens (cond) or views (images)")
    return batch


class LatentStream(IterableDataset):
    """Streams latent shards (shuffled per pass), batches by token budget: a batch holds samples until
    adding the next would exceed ``batch_tokens`` latent tokens (at least one sample, at most ``max_batch``).
    Samples with more than ``max_tokens`` tokens are skipped. ``loop``: repeat forever (training).
    ``cache``: keep this reader's samples in memory after the first pass, so later passes do not re-read the
    shards (small data sets, e.g. a few shapes trained for thousands of steps)."""

    def __init__(self, shards: list[str], batch_tokens: int, max_batch: int = 64, max_tokens: int | None = None,
                 shuffle: bool = True, loop: bool = True, seed: int = 0, view: str = "random", buffer: int = 256,
                 cache: bool = False) -> None:
        self.shards, self.batch_tokens, self.max_batch, self.max_tokens = shards, batch_tokens, max_batch, max_tokens
        self.shuffle, self.loop, self.seed, self.view, self.buffer = shuffle, loop, seed, view, buffer
        self.cache = cache

    def _samples(self, rng: random.Random) -> Iterator[dict]:
        """Each reader (rank x worker) takes every count-th shard, or every count-th sample when there are
        fewer shards than readers."""
        slot, count = _reader_slot()
        by_shard = len(self.shards) >= count
        shards = self.shards[slot::count] if by_shard else self.shards
        if self.cache:
            yield from self._cached_samples(shards, by_shard, slot, count, rng)
            return
        while True:
            order = list(shards)
            if self.shuffle:
                rng.shuffle(order)
            pool: list[dict] = []
            for path in order:
                for i, s in enumerate(read_latent_shard(path)):
                    if not by_shard and i % count != slot:
                        continue
                    if self.max_tokens is not None and len(s["coords"]) > self.max_tokens:
                        continue
                    pool.append(s)
                    if len(pool) >= self.buffer:
                        yield pool.pop(rng.randrange(len(pool)) if self.shuffle else 0)
            if self.shuffle:
                rng.shuffle(pool)
            yield from pool
            if not self.loop:
                return

    def _cached_samples(self, shards: list[str], by_shard: bool, slot: int, count: int, rng: random.Random) -> Iterator[dict]:
        """This reader's samples read once, then every pass reshuffled from memory."""
        cached = [s for path in shards for i, s in enumerate(read_latent_shard(path))
                  if (by_shard or i % count == slot) and (self.max_tokens is None or len(s["coords"]) <= self.max_tokens)]
        while True:
            order = list(cached)
            if self.shuffle:
                rng.shuffle(order)
            yield from order
            if not self.loop:
                return

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.seed * 7919 + _reader_slot()[0])
        group: list[dict] = []
        tokens = 0
        for s in self._samples(rng):
            n = len(s["coords"])
            if group and (tokens + n > self.batch_tokens or len(group) >= self.max_batch):
                yield collate_latents(group, self.view, rng)
                group, tokens = [], 0
            group.append(s)
            tokens += n
        if group:
            yield collate_latents(group, self.view, rng)


class LatentDataModule(L.LightningDataModule):
    """DiT data: ``train_shards`` / ``val_shards`` globs of latent shards; batches bounded by ``batch_tokens``;
    ``cache``: keep the samples in memory after the first pass (see :class:`LatentStream`)."""

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None = None, batch_tokens: int = 32768,
                 max_batch: int = 64, max_tokens: int | None = None, num_workers: int = 0, seed: int = 0,
                 cache: bool = False) -> None:
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_tokens, self.max_batch, self.max_tokens = batch_tokens, max_batch, max_tokens
        self.num_workers, self.seed, self.cache = num_workers, seed, cache

    def _loader(self, spec, train: bool) -> DataLoader:
        stream = LatentStream(expand_shards(spec), self.batch_tokens, self.max_batch, self.max_tokens, shuffle=train,
                              loop=train, seed=self.seed, view="random" if train else "first", cache=self.cache)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_shards, False) if self.val_shards else []
