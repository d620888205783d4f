"""Data for the sparse SDF VAE: streamed samples -> per-step resolution -> token-budget batches.

Every training batch draws its resolution R from ``resolutions`` (multi-resolution training), takes
samples at R (stored or trilinearly resampled by the data-prep routine) and packs them until the voxel
budget ``batch_voxels`` (decoded voxels = all voxels of the occupied cells) would be exceeded. Samples with
no input voxel at R are dropped with a warning.

Sources: :class:`ShardSource` (data-prep shards of one split through webdataset, split over DDP ranks and
loader workers) or :class:`AnalyticSource` (exact sphere/box/torus SDFs: tests, smoke runs). With an analytic
source batch i is a function of (seed, i); with shards the stream position is saved in the checkpoint. Either
way a resumed run sees exactly the batches the uninterrupted run would.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data.batching import BudgetPacker
from ..data.stream_position import first_batch, positioned, restore_reader
from ..data.sdf_transforms import SDFSample, analytic_sample, collate, sample_at_resolution
from .stream_state import StreamStateMixin

log = logging.getLogger(__name__)


class ShardSource:
    """Decoded samples of the data-prep shards of one split (a folder, glob, URL or list: see
    :func:`d3ds2.data.layout.shard_urls`), read through :class:`d3ds2.data.shards.ShardReader`."""

    persistent = True  # one stream per reader for the whole run, with a resumable position

    def __init__(self, spec, split: str = "train", shuffle_buffer: int = 64, resample: bool = False,
                 max_skip_fraction: float = 0.01) -> None:
        from ..data.layout import shard_urls

        self.urls = shard_urls(spec, split, hint="write them with `python -m data_prep input=MESHES output=DIR` and "
                                                 "point data.train_shards / data.val_shards at DIR/shards")
        self.shuffle_buffer, self.resample, self.max_skip_fraction = shuffle_buffer, resample, max_skip_fraction

    def reader(self, slot: int, slots: int, seed: int):
        from ..data.shards import ShardReader, decode_data_sample

        return ShardReader(self.urls, slot, slots, partial(decode_data_sample, with_views=False), seed,
                           self.shuffle_buffer, self.resample, self.max_skip_fraction)

    def at_resolution(self, item: dict, resolution: int) -> SDFSample:
        return sample_at_resolution(item, resolution)


class AnalyticSource:
    """Random picks among analytic shapes (names of ``sdf_transforms.ANALYTIC_SHAPES``), exact at any R."""

    persistent = False  # a fresh stream per batch, seeded by the batch index

    def __init__(self, shapes: list[str], band: float = 4.0, trunc: float = 7.9375) -> None:
        self.shapes, self.band, self.trunc = list(shapes), band, trunc

    def stream(self, seed: Any) -> Iterator[str]:
        rng = np.random.default_rng(seed)
        while True:
            yield self.shapes[int(rng.integers(len(self.shapes)))]

    def at_resolution(self, item: str, resolution: int) -> SDFSample:
        return analytic_sample(item, resolution, self.band, self.trunc)


class VAEBatchStream(IterableDataset):
    """Endless VAE batches; global batch g (counted from ``start``) uses resolution rng (seed, g).

    With W loader workers, worker w yields the batches g = start + w + k W in the order the DataLoader takes
    them (see :mod:`d3ds2.data.stream_position`); a ``position`` saved from a run puts every role's shard
    reader back where it stood. ``with_position``: yield :class:`~d3ds2.data.stream_position.Positioned` batches.
    """

    def __init__(self, source, resolutions: list[int], batch_voxels: int, max_samples: int | None,
                 sdf_scale: float, seed: int, start: int = 0, position: dict | None = None,
                 with_position: bool = False) -> None:
        self.source, self.resolutions = source, list(resolutions)
        self.batch_voxels, self.max_samples, self.sdf_scale = batch_voxels, max_samples, sdf_scale
        self.seed, self.start, self.position, self.with_position = seed, start, position, with_position

    def _take(self, item, resolution: int) -> SDFSample | None:
        sample = self.source.at_resolution(item, resolution)
        if sample.num_input_voxels == 0:
            log.warning("sample %r has no voxel at resolution %d: dropped", sample.name or item, resolution)
            return None
        if len(sample) > self.batch_voxels:
            log.warning("sample %r has %d voxels at resolution %d, over the batch budget %d: dropped",
                        sample.name, len(sample), resolution, self.batch_voxels)
            return None
        return sample

    def __iter__(self):
        from ..data.shards import dist_rank, loader_worker

        rank, world = dist_rank()
        worker, workers = loader_worker()
        start = first_batch(self.position, self.start)
        role = (start + worker) % workers
        reader = None
        if self.source.persistent:
            reader = restore_reader(self.source.reader(rank * workers + role, world * workers, self.seed),
                                    self.position, rank, world, role, workers)
        items = reader.samples() if reader is not None else None
        pending = None
        g = start + worker
        while True:
            resolution = int(np.random.default_rng((self.seed, g, 7)).choice(self.resolutions))
            if reader is None:
                items, pending = self.source.stream((self.seed, g)), None
            packer: BudgetPacker[SDFSample] = BudgetPacker(self.batch_voxels, self.max_samples)
            dropped = 0
            while True:
                item = pending if pending is not None else next(items, None)
                pending = None
                if item is None:  # a finite source ran out: last (partial) batch
                    break
                sample = self._take(item, resolution)
                if sample is None:
                    dropped += 1
                    if dropped > 1000:
                        raise RuntimeError(f"1000 samples in a row were dropped at resolution {resolution}; see warnings")
                    continue
                if not packer.fits(len(sample)):
                    pending = item
                    break
                packer.add(sample, len(sample))
            if not len(packer):
                return
            batch = collate(packer.pop(), self.sdf_scale)
            if self.with_position:
                batch = positioned(batch, g, rank, role, world, workers, reader, pending is not None)
            yield batch
            g += workers


def _source(spec, split: str, **shard_args) -> Any:
    """A shard source (folder, glob, URL or a list of them) or a list of analytic shape names."""
    from ..data.sdf_transforms import ANALYTIC_SHAPES

    if spec is None:
        return None
    if hasattr(spec, "stream") or hasattr(spec, "reader"):
        return spec
    names = [spec] if isinstance(spec, str) else list(spec)
    if names and all(str(n) in ANALYTIC_SHAPES for n in names):
        return AnalyticSource([str(n) for n in names])
    return ShardSource([str(n) for n in names], split, **shard_args)


class VAEDataModule(StreamStateMixin, L.LightningDataModule):
    """Args:
    train_shards / val_shards: data-prep shards (a folder such as ``DATA/shards``, whose ``train-*.tar`` /
        ``val-*.tar`` are read; a glob; a ``pipe:`` or ``http(s)://`` URL with brace ranges; or a list) or a list
        of analytic shape names (``[sphere, box, torus]``); val defaults to train.
    resolutions: training resolutions, one drawn per batch (the paper: [256, 384, 512]).
    val_resolution: resolution of validation batches (one sample each).
    batch_voxels: voxel budget per batch (decoded voxels); max_samples: cap on samples per batch.
    sdf_scale: voxels mapped to 1 by the normalisation clamp(sdf / sdf_scale, -1, 1).
    shuffle_buffer: samples in the shuffle buffer of each reader; resample: draw shards with replacement.
    max_skip_fraction: damaged samples allowed per epoch and reader before the run stops.

    The training stream's position (epoch, offset of every reader) is saved in checkpoints, so a resumed run
    reads the samples an uninterrupted one would have.
    """

    def __init__(self, train_shards, val_shards=None, resolutions=(256, 384, 512), val_resolution: int = 256,
                 batch_voxels: int = 2_000_000, max_samples: int | None = None, sdf_scale: float = 8.0,
                 num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 64, resample: bool = False,
                 max_skip_fraction: float = 0.01) -> None:
        super().__init__()
        self.train_spec, self.val_spec = train_shards, val_shards if val_shards is not None else train_shards
        self.resolutions, self.val_resolution = list(resolutions), val_resolution
        self.batch_voxels, self.max_samples, self.sdf_scale = batch_voxels, max_samples, sdf_scale
        self.num_workers, self.seed = num_workers, seed
        self.shard_args = {"shuffle_buffer": shuffle_buffer, "resample": resample,
                           "max_skip_fraction": max_skip_fraction}

    def _loader(self, stream: VAEBatchStream) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False, collate_fn=None)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        return self._loader(VAEBatchStream(_source(self.train_spec, "train", **self.shard_args), self.resolutions,
                                           self.batch_voxels, self.max_samples, self.sdf_scale, self.seed, start,
                                           position=self.position, with_position=True))

    def val_dataloader(self) -> DataLoader:
        split = "train" if self.val_spec is self.train_spec else "val"
        return self._loader(VAEBatchStream(_source(self.val_spec, split, **self.shard_args), [self.val_resolution],
                                           self.batch_voxels, 1, self.sdf_scale, self.seed + 1))
