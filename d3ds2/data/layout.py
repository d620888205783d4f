"""The layout of a data folder: every writer (data prep, encode_latents, latent_stats) and every reader (the data
modules) takes its file names from here.

  DATA/samples/KEY.tar                                one finished sample (data prep resumes from these)
  DATA/manifest/rank{r:03d}.jsonl                     data prep: one line per input (ok / skipped + reason)
  DATA/shards/{split}-rank{r:03d}-{i:05d}.tar         webdataset shards of one split (train or val)
  DATA/latents/{R}/{split}-rank{r:03d}-{i:05d}.tar    latent shards, one per data shard of the same name
  DATA/latents/{R}/stats.json                         per-channel latent mean/std over the train split
  DATA/latents/{R}/encoder.json                       the VAE that encoded them (checkpoint sha256, sdf_scale, ...)

A shard source given to a reader is a folder (its ``{split}-*.tar``), a glob, a ``pipe:`` command, an
``http(s)://`` URL with optional brace ranges (``.../train-rank000-{00000..00009}.tar``), or a list of these.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

SPLITS = ("train", "val")
LATENT_STATS = "stats.json"
LATENT_ENCODER = "encoder.json"


@dataclass(frozen=True)
class DataLayout:
    """Paths under one data folder ``root``."""

    root: str

    @property
    def samples_dir(self) -> str:
        return os.path.join(self.root, "samples")

    def sample(self, key: str) -> str:
        return os.path.join(self.samples_dir, f"{key}.tar")

    def manifest(self, rank: int) -> str:
        return os.path.join(self.root, "manifest", f"rank{rank:03d}.jsonl")

    @property
    def shards_dir(self) -> str:
        return os.path.join(self.root, "shards")

    def shard(self, split: str, rank: int, index: int) -> str:
        return os.path.join(self.shards_dir, shard_name(split, rank, index))

    def latents_dir(self, resolution: int) -> str:
        return os.path.join(self.root, "latents", str(int(resolution)))

    def latent_stats(self, resolution: int) -> str:
        return os.path.join(self.latents_dir(resolution), LATENT_STATS)

    def latent_encoder(self, resolution: int) -> str:
        return os.path.join(self.latents_dir(resolution), LATENT_ENCODER)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    return split


def shard_name(split: str, rank: int, index: int) -> str:
    """``train-rank000-00000.tar``: the split, the writing rank and the shard's index on that rank."""
    return f"{check_split(split)}-rank{rank:03d}-{index:05d}.tar"


def split_pattern(split: str) -> str:
    return f"{check_split(split)}-*.tar"


def split_of(path: str) -> str | None:
    """The split a shard file name says (None for a name of no split)."""
    head = os.path.basename(path).split("-", 1)[0]
    return head if head in SPLITS else None


def is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def shard_urls(spec, split: str | None = None, hint: str = "") -> list[str]:
    """A shard source (see the module docstring) -> the list of shard paths / URLs it names, in sorted order.

    A folder yields its ``{split}-*.tar``; a local pattern must match a file. Raises FileNotFoundError naming the
    source, the split and ``hint`` (the command that writes such shards) when nothing is found.
    """
    from webdataset.shardlists import expand_urls

    if spec is None:
        raise ValueError("no shard source given")
    if not isinstance(spec, str):
        return [u for s in spec for u in shard_urls(str(s), split, hint)]
    if is_remote(spec):
        return expand_urls(spec)
    where = f" of split {split!r}" if split else ""
    if os.path.isdir(spec):
        if split is None:
            raise ValueError(f"{spec} is a folder: give the split to read from it")
        found = sorted(glob.glob(os.path.join(spec, split_pattern(split))))
        if not found:
            others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(spec, "*.tar")))[:3]
            raise FileNotFoundError(
                f"no shards{where} in {spec} (expected {split_pattern(split)}"
                + (f"; found only {others}" if others else "") + ")" + (f"; {hint}" if hint else ""))
        return found
    found = sorted(p for pattern in expand_urls(spec) for p in glob.glob(pattern))
    if not found:
        what = f"{spec} does not exist" if glob.escape(spec) == spec else f"no shard file matches {spec!r}"
        raise FileNotFoundError(what + (f" (looking for {split} shards)" if split else "") + (f"; {hint}" if hint else ""))
    return found
