"""A minimal sparse regression task that exercises the whole training stack in seconds on a CPU.

Data: voxels of random sphere shells; target: each voxel's signed radial distance to the sphere (voxels).
Used by ``experiment=toy`` and the training-stack tests; real models have their own modules.
"""
from __future__ import annotations

from functools import partial

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

from ..sparse import SparseSiLU, SparseTensor, SubMConv3d
from .base_module import BaseModule


def random_shell_batch(batch_size: int, res: int, generator: torch.Generator) -> tuple[SparseTensor, torch.Tensor]:
    """(SparseTensor with 1 channel = 1, target [N] signed radial distance) for random shells."""
    feats, coords, targets = [], [], []
    g = torch.arange(res, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).view(-1, 3)
    for _ in range(batch_size):
        centre = res / 2 + (torch.rand(3, generator=generator) - 0.5) * res * 0.2
        radius = res * (0.2 + 0.15 * float(torch.rand((), generator=generator)))
        d = (grid - centre).norm(dim=1) - radius
        keep = d.abs() < 2.0
        coords.append(grid[keep].floor().int())
        targets.append(d[keep])
        feats.append(torch.ones(int(keep.sum()), 1))
    # carry the target as a second feature channel so it is sorted together with the voxels
    x = SparseTensor.from_samples([torch.stack([f[:, 0], t], 1) for f, t in zip(feats, targets)], coords)
    return x.replace(x.feats[:, :1].contiguous()), x.feats[:, 1].contiguous()


class _ShellStream(IterableDataset):
    """Batch i is drawn from seed (seed, i), so a resumed run continues the exact same stream."""

    def __init__(self, batch_size: int, res: int, seed: int, start: int = 0) -> None:
        self.batch_size, self.res, self.seed, self.start = batch_size, res, seed, start

    def __iter__(self):
        i = self.start
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            yield random_shell_batch(self.batch_size, self.res, gen)
            i += 1


class ToyShellDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 2, resolution: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.resolution, self.seed = batch_size, resolution, seed

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(_ShellStream(self.batch_size, self.resolution, self.seed, start), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_ShellStream(self.batch_size, self.resolution, self.seed + 1), batch_size=None)


class ToySparseNet(nn.Module):
    """Stack of 3³ submanifold convs: [N, 1] -> [N, 1]."""

    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [SubMConv3d(1, width)]
        for _ in range(depth - 1):
            layers += [SparseSiLU(), SubMConv3d(width, width)]
        layers += [SparseSiLU(), SubMConv3d(width, 1, kernel_size=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.layers(x)


class ToySparseRegression(BaseModule):
    def __init__(self, net: nn.Module, optimizer: partial, scheduler: partial | None = None) -> None:
        super().__init__(net, optimizer, scheduler)

    def _batch_size(self, batch) -> int:
        return batch[0].batch_size

    def compute_loss(self, batch, stage):
        x, target = batch
        pred = self.net(x).feats[:, 0]
        loss = (pred.float() - target).pow(2).mean()
        return loss, {"mse": loss.detach()}, x.num_voxels
