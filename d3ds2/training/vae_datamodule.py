"""Data for the sparse SDF VAE: streamed samples -> per-step resolution -> token-budget batches.

Every training batch draws its resolution R from ``resolutions`` (multi-resolution training), takes
samples at R (stored or trilinearly resampled by the data-prep routine) and packs them until the voxel
budget ``batch_voxels`` (decoded voxels = all voxels of the occupied cells) would be exceeded. Samples with
no input voxel at R are dropped with a warning.

Sources: :class:`ShardSource` (data-prep tar shards, split over DDP ranks and workers) or
:class:`AnalyticSource` (exact sphere/box/torus SDFs: tests, smoke runs). With an analytic source batch i
is a function of (seed, i), so a resumed run sees exactly the batches the uninterrupted run would.
"""
from __future__ import annotations

import glob
import logging
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data.batching import BudgetPacker
from ..data.sdf_transforms import SDFSample, analytic_sample, collate, sample_at_resolution

log = logging.getLogger(__name__)


class ShardSource:
    """Decoded samples from the tar shards matching ``pattern`` (looped over epochs)."""

    persistent = True  # one stream for the whole run

    def __init__(self, pattern: str, shuffle_buffer: int = 64) -> None:
        self.urls = sorted(glob.glob(pattern))
        if not self.urls:
            raise FileNotFoundError(
                f"no shard matches {pattern!r}; build shards with `python -m data_prep input=MESHES output=DIR` "
                "and point data.train_shards (or data.val_shards) at DIR/shards/*.tar"
            )
        self.shuffle_buffer = shuffle_buffer

    def stream(self, seed: int) -> Iterator[dict]:
        from ..data.shards import ShardStream

        reader = ShardStream(self.urls, self.shuffle_buffer, seed, with_views=False)
        epoch = 0
        while True:
            reader.set_epoch(epoch)
            yielded = False
            for sample in reader:
                yielded = True
                yield sample
            if not yielded:
                raise RuntimeError(f"this rank/worker got no sample from {len(self.urls)} shards; use fewer workers")
            epoch += 1

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
    """Endless VAE batches; batch i (counted from ``start``) uses resolution rng (seed, i)."""

    def __init__(self, source, resolutions: list[int], batch_voxels: int, max_samples: int | None,
                 sdf_scale: float, seed: int, start: int = 0) -> None:
        self.source, self.resolutions = source, list(resolutions)
        self.batch_voxels, self.max_samples, self.sdf_scale = batch_voxels, max_samples, sdf_scale
        self.seed, self.start = seed, start

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
        items = self.source.stream(self.seed * 1_000_003 + self.start) if self.source.persistent else None
        pending = None
        i = self.start
        while True:
            resolution = int(np.random.default_rng((self.seed, i, 7)).choice(self.resolutions))
            if not self.source.persistent:
                items, pending = self.source.stream((self.seed, i)), None
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
            yield collate(packer.pop(), self.sdf_scale)
            i += 1


def _source(spec) -> Any:
    if spec is None:
        return None
    if isinstance(spec, str):
        return ShardSource(spec)
    if isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not hasattr(spec, "stream"):
        return AnalyticSource(list(spec))
    return spec


class VAEDataModule(L.LightningDataModule):
    """Args:
    train_shards / val_shards: a glob of data-prep shards (``.../shards/*.tar``) or a list of analytic shape
        names (``[sphere, box, torus]``); val defaults to train.
    resolutions: training resolutions, one drawn per batch (the paper: [256, 384, 512]).
    val_resolution: resolution of validation batches (one sample each).
    batch_voxels: voxel budget per batch (decoded voxels); max_samples: cap on samples per batch.
    sdf_scale: voxels mapped to 1 by the normalisation clamp(sdf / sdf_scale, -1, 1).
    """

    def __init__(self, train_shards, val_shards=None, resolutions=(256, 384, 512), val_resolution: int = 256,
                 batch_voxels: int = 2_000_000, max_samples: int | None = None, sdf_scale: float = 8.0,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.train_spec, self.val_spec = train_shards, val_shards if val_shards is not None else train_shards
        self.resolutions, self.val_resolution = list(resolutions), val_resolution
        self.batch_voxels, self.max_samples, self.sdf_scale = batch_voxels, max_samples, sdf_scale
        self.num_workers, self.seed = num_workers, seed

    def _loader(self, stream: VAEBatchStream) -> DataLoader:
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False, collate_fn=None)

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        return self._loader(VAEBatchStream(_source(self.train_spec), self.resolutions, self.batch_voxels,
                                           self.max_samples, self.sdf_scale, self.seed, start))

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAEBatchStream(_source(self.val_spec), [self.val_resolution], self.batch_voxels, 1,
                                           self.sdf_scale, self.seed + 1))
