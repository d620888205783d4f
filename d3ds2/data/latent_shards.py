"""Latent shards (what the DiTs train on): the format, writing, reading and the token-budget batch stream.

A latent shard is a webdataset tar; each sample holds the entries of ``LATENT_KEYS`` (npz):
  ``{key}.latent.npz``  coords int16 [M, 3] occupied latent cells (fine resolution R / 8), feats float16
                         [M, C] posterior means of the sparse SDF VAE, ``resolution`` = R
  ``{key}.cond.npz``    (optional) tokens float16 [V, L, C] pre-computed DINOv2 features of V views, fg bool
                         [V, P] foreground patch mask of each view
  ``{key}.views.npz``   (optional) images uint8 [V, S, S, 4] preprocessed views (RGB on white + mask) when the
                         condition is computed on the fly
``python -m data_prep.encode_latents`` writes them (names from :mod:`d3ds2.data.layout`).
"""
from __future__ import annotations

import io
import json
import os
import random
from functools import partial
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..hashing import file_sha256
from ..sparse import SparseTensor
from .batching import BudgetPacker
from .layout import shard_urls
from .shards import ShardReader, dist_rank, loader_worker, read_tar, write_tar_atomic
from .stream_position import first_batch, positioned, restore_reader

LATENT_KEYS = ("latent", "cond", "views")
HINT = "write them with `python -m data_prep.encode_latents data=DATA resolution=R vae=VAE_RUN` (docs/generation.md)"


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def encode_latent_sample(s: dict) -> dict:
    """{key, coords [M,3], feats [M,C], resolution, tokens?, fg?, images?} -> webdataset dict of bytes."""
    out = {"__key__": s["key"],
           "latent.npz": _npz_bytes(coords=np.asarray(s["coords"], np.int16), feats=np.asarray(s["feats"], np.float16),
                                    resolution=np.int32(s["resolution"]))}
    if s.get("tokens") is not None:
        out["cond.npz"] = _npz_bytes(tokens=np.asarray(s["tokens"], np.float16), fg=np.asarray(s["fg"], bool))
    if s.get("images") is not None:
        out["views.npz"] = _npz_bytes(images=np.asarray(s["images"], np.uint8))
    return out


def decode_latent_sample(raw: dict) -> dict:
    """Webdataset dict -> {key, coords, feats, resolution[, tokens, fg][, images]} (numpy)."""
    unknown = [k for k in raw if not k.startswith("__") and k.removesuffix(".npz") not in LATENT_KEYS]
    if unknown or "latent.npz" not in raw:
        raise ValueError(f"sample {raw.get('__key__')}: entries {sorted(k for k in raw if not k.startswith('__'))}; "
                         f"a latent shard holds latent.npz and optionally {LATENT_KEYS[1:]}")
    out = {"key": raw["__key__"]}
    for name in LATENT_KEYS:
        if f"{name}.npz" in raw:
            with np.load(io.BytesIO(raw[f"{name}.npz"])) as z:
                out.update({k: z[k] for k in z.files})
    return out


def write_latent_shard(path: str, samples: list[dict]) -> None:
    """Write latent samples as one shard, atomically (its folder is created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_tar_atomic(str(path), [encode_latent_sample(s) for s in samples])


def read_latent_shard(url: str) -> list[dict]:
    """Every sample of one latent shard (a damaged shard raises, naming it)."""
    return [decode_latent_sample(raw) for raw in read_tar(str(url))]


def latent_shard_urls(spec, split: str | None = None) -> list[str]:
    """A latent shard source (folder ``DATA/latents/R``, glob, URL, list) -> shard URLs; clear error if none."""
    return shard_urls(spec, split, HINT)


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
    """Latent batches of this rank and loader worker: samples from a :class:`ShardReader` (webdataset; shard
    order, shuffle buffer and splitting over ranks x workers as there), packed by token budget: a batch holds
    samples until adding the next would exceed ``batch_tokens`` latent tokens (at least one sample, at most
    ``max_batch``). Samples with more than ``max_tokens`` tokens are skipped. ``loop``: epoch after epoch
    (training), else one epoch. ``shuffle``: shuffle buffer of ``buffer`` samples and a shard order per epoch
    (else file order). ``cache``: keep this reader's samples in memory after the first epoch and reshuffle them
    from there (small data sets trained for many steps). The view of each sample is drawn by rng (seed, g) of
    the global batch index g. ``with_position``: yield :class:`~d3ds2.data.stream_position.Positioned` batches;
    ``position`` (saved from a run) resumes the stream where it stood (not with ``cache``: that restarts it)."""

    def __init__(self, shards: list[str], batch_tokens: int, max_batch: int = 64, max_tokens: int | None = None,
                 shuffle: bool = True, loop: bool = True, seed: int = 0, view: str = "random", buffer: int = 256,
                 cache: bool = False, resample: bool = False, max_skip_fraction: float = 0.01,
                 position: dict | None = None, with_position: bool = False) -> None:
        self.shards, self.batch_tokens, self.max_batch, self.max_tokens = shards, batch_tokens, max_batch, max_tokens
        self.shuffle, self.loop, self.seed, self.view, self.buffer = shuffle, loop, seed, view, buffer
        self.cache, self.resample, self.max_skip = cache, resample, max_skip_fraction
        self.position, self.with_position = position, with_position

    def _samples(self, reader: ShardReader, rng: random.Random) -> Iterator[dict]:
        if not self.cache:
            yield from (reader.samples() if self.loop else reader.epoch_samples())
            return
        cached = list(reader.epoch_samples())
        while True:
            order = list(cached)
            if self.shuffle:
                rng.shuffle(order)
            yield from order
            if not self.loop:
                return

    def __iter__(self) -> Iterator[dict]:
        rank, world = dist_rank()
        worker, workers = loader_worker()
        g = first_batch(None if self.cache else self.position, 0)
        role = (g + worker) % workers
        reader = ShardReader(self.shards, rank * workers + role, world * workers, partial(decode_latent_sample),
                             self.seed, self.buffer if self.shuffle else 0, self.resample, self.max_skip)
        if not self.cache:
            restore_reader(reader, self.position, rank, world, role, workers)
        g += worker
        packer: BudgetPacker[dict] = BudgetPacker(self.batch_tokens, self.max_batch)

        def batch(pending: bool):
            out = collate_latents(packer.pop(), self.view, random.Random(self.seed * 7919 + g))
            return positioned(out, g, rank, role, world, workers, reader, pending) if self.with_position else out

        for s in self._samples(reader, random.Random(self.seed * 7919 + rank * workers + role)):
            n = len(s["coords"])
            if self.max_tokens is not None and n > self.max_tokens:
                continue
            if len(packer) and not packer.fits(n):
                yield batch(pending=True)
                g += workers
            packer.add(s, n)
        if len(packer):
            yield batch(pending=False)


def latent_stats(shards: list[str]) -> dict:
    """{"mean": [C], "std": [C], "tokens": int, "samples": int} over every latent token (float64 sums)."""
    total, sq, count, samples = None, None, 0, 0
    for url in shards:
        for s in read_latent_shard(url):
            f = s["feats"].astype(np.float64)
            total = f.sum(0) if total is None else total + f.sum(0)
            sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
            count += len(f)
            samples += 1
    if count == 0:
        raise ValueError(f"no latent tokens in {shards}")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "tokens": count, "samples": samples}


def write_json_atomic(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def check_encoder(encoder_json: str, vae_ckpt: str, what: str = "these latents") -> dict:
    """The encoder metadata of a latents folder, checked against the VAE checkpoint a stage expects.

    Raises ValueError naming both checkpoints when the latents were encoded by another VAE, and
    FileNotFoundError when the folder has no metadata."""
    if not os.path.isfile(encoder_json):
        raise FileNotFoundError(f"{encoder_json} not found: {what} carry no record of the VAE that encoded them; "
                                f"re-encode them ({HINT})")
    with open(encoder_json) as f:
        meta = json.load(f)
    sha = file_sha256(vae_ckpt)
    if meta.get("vae_sha256") != sha:
        raise ValueError(f"{what} were encoded by the VAE {meta.get('vae_checkpoint')} (sha256 "
                         f"{str(meta.get('vae_sha256'))[:12]}), but this stage uses {vae_ckpt} (sha256 {sha[:12]}); "
                         f"re-encode them with this VAE into another data folder ({HINT}) or point the stage at "
                         "the VAE that encoded them")
    return meta
