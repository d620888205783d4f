"""Webdataset shards: atomic writing, a JSONL manifest, and a streaming reader with DDP/worker splitting.

Every file is written under a temporary name in the same folder and renamed when complete, so a killed
process or a full disk never leaves a half-written file under a final name.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np

from d3ds2.data.shard_format import decode_sample


def write_tar_atomic(path: str, samples: list[dict]) -> None:
    """Write webdataset dicts (`__key__` + name -> bytes) as one tar at `path` (temp name, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample in samples:
                key = sample["__key__"]
                for name, data in sorted(sample.items()):
                    if name.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_tar(path: str) -> list[dict]:
    """All samples of a tar as webdataset dicts (entries grouped by key, in file order)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, name = os.path.basename(member.name).partition(".")
            samples.setdefault(key, {"__key__": key})[name] = tar.extractfile(member).read()
    return list(samples.values())


class Manifest:
    """Append-only JSONL: one line per input ({key, source, status: ok|skipped, reason, seconds, ...})."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore, the input is redone
                    pass
        return out

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def shards_for(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one data-loader worker of one rank reads: disjoint, covering all when sizes divide."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return urls[slot::slots]


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


try:
    from torch.utils.data import IterableDataset as _IterableBase
except ImportError:  # pragma: no cover
    _IterableBase = object


class ShardStream(_IterableBase):
    """Streams decoded samples from tar shards, split over DDP ranks and loader workers, with shuffling.

    Each epoch (`set_epoch`) reshuffles the shard order (same order on every rank: seeded by seed + epoch)
    and passes samples through a shuffle buffer of `shuffle_buffer` samples (0 = file order).
    `resolutions` / `with_views` limit what is decoded. Rank and world size come from torch.distributed
    (or RANK / WORLD_SIZE) unless given.
    """

    def __init__(self, urls: list[str], shuffle_buffer: int = 64, seed: int = 0, resolutions=None,
                 with_views: bool = True, rank: int | None = None, world_size: int | None = None):
        if not urls:
            raise ValueError("ShardStream: no shard given")
        self.urls, self.buffer, self.seed = sorted(urls), shuffle_buffer, seed
        self.resolutions, self.with_views = resolutions, with_views
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rank, world = _dist_rank()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        worker, workers = _worker()
        urls = list(self.urls)
        if self.buffer:
            np.random.default_rng(self.seed + self.epoch).shuffle(urls)
        rng = np.random.default_rng((self.seed, self.epoch, rank, worker))
        buf = []
        for url in shards_for(urls, rank, world, worker, workers):
            for raw in read_tar(url):
                sample = decode_sample(raw, self.resolutions, self.with_views)
                if self.buffer <= 0:
                    yield sample
                    continue
                buf.append(sample)
                if len(buf) >= self.buffer:
                    yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))
