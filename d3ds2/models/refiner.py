"""Dense 3D-UNet refiners of the Direct3D-S2 release, run patch by patch over the decoded SDF grid.

* :class:`VoxelRefiner` (official ``Voxel_RefinerXL``, 512 model): the tanh SDF and the decoder's last
  32-channel features -> a new SDF for the whole grid (fills the interior, re-predicts the surface).
* :class:`SignRefiner` (official ``Voxel_RefinerXL_sign``, 1024 model): the SDF mean-pooled to half
  resolution -> inside / outside sign of every voxel; band voxels keep their decoded value.

Module and parameter names follow the official checkpoints (``unet3d1.down_blocks.0.resnets.0.norm1`` ...),
so ``model_refiner.ckpt`` / ``model_refiner_1024.ckpt`` load key for key. Patch tiling: ``patches`` per axis
of side ``patch`` at offsets ``i * stride`` (official 3 x 192 / 160 at 512 and 3 x 256 / 128 for the sign
grid at 512); overlaps are blended with linear ramps (XL) or overwritten in patch order (sign), as
officially. Dense grids are assembled on ``grid_device`` (the CPU for low VRAM); only one patch and its
input crop live on the compute device at a time.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sparse import SparseTensor
from ..sparse.spatial import mean_pool

UNET_CHANNELS = (8, 32, 128, 512)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) float32, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = x if x.dtype == torch.float64 else x.float()
        w, b = self.weight.to(h.dtype), self.bias.to(h.dtype)
        return F.group_norm(h, self.num_groups, w, b, self.eps).to(x.dtype)


class ResnetBlock3D(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus the input (1x1 conv ``conv_shortcut`` if channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm32(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Resample(nn.Module):
    """Holder of the stride-2 ``conv`` (Conv3d k2 down, ConvTranspose3d k2 up)."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        self.conv = (nn.ConvTranspose3d if up else nn.Conv3d)(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet3D(nn.Module):
    """Diffusers-style 3D UNet without time embedding: [B, in, D, D, D] -> [B, channels[0], D, D, D].

    Down stages of ``layers_per_block`` resnets (+ k2 s2 downsampler except the last), a mid block of
    1 + ``layers_mid_block`` resnets, up stages of ``layers_per_block + 1`` resnets on skip-concatenated
    inputs (+ k2 s2 transposed-conv upsampler except the last), GN -> SiLU out. D must divide by 2^(stages-1).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...] = UNET_CHANNELS, layers_per_block: int = 2,
                 layers_mid_block: int = 2, groups: int = 4, eps: float = 1e-5):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            stage = nn.Module()
            stage.resnets = nn.ModuleList(ResnetBlock3D(prev if j == 0 else c, c, groups, eps) for j in range(layers_per_block))
            if i + 1 < len(channels):
                stage.downsamplers = nn.ModuleList([_Resample(c, up=False)])
            self.down_blocks.append(stage)
            prev = c
        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList(ResnetBlock3D(prev, prev, groups, eps) for _ in range(1 + layers_mid_block))
        rev = list(reversed(channels))
        self.up_blocks = nn.ModuleList()
        prev_out = rev[0]
        for i, c in enumerate(rev):
            skip_in = rev[min(i + 1, len(rev) - 1)]
            stage = nn.Module()
            n = layers_per_block + 1
            stage.resnets = nn.ModuleList(
                ResnetBlock3D((prev_out if j == 0 else c) + (skip_in if j == n - 1 else c), c, groups, eps) for j in range(n))
            if i + 1 < len(rev):
                stage.upsamplers = nn.ModuleList([_Resample(c, up=True)])
            self.up_blocks.append(stage)
            prev_out = c
        self.conv_norm_out = GroupNorm32(groups, channels[0], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down_blocks:
            for r in stage.resnets:
                h = r(h)
                skips.append(h)
            if hasattr(stage, "downsamplers"):
                h = stage.downsamplers[0](h)
                skips.append(h)
        for r in self.mid_block.resnets:
            h = r(h)
        for stage in self.up_blocks:
            for r in stage.resnets:
                h = r(torch.cat([h, skips.pop()], 1))
            if hasattr(stage, "upsamplers"):
                h = stage.upsamplers[0](h)
        return F.silu(self.conv_norm_out(h))


class GeoDecoder(nn.Module):
    """Per-voxel MLP on the decoder features: ``net`` = Linear -> ReLU -> ... -> Linear(hidden, 8)."""

    def __init__(self, in_features: int = 32, hidden: int = 32, layers: int = 4, out_features: int = 8):
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
        for _ in range(layers - 2):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, out_features))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def adaptive_smooth(x: torch.Tensor, weights: torch.Tensor, times: int = 3) -> torch.Tensor:
    """x [B, C, D, H, W] -> ``times`` x the per-voxel 3x3x3 weighted neighbourhood sum (zero padded) with the
    same weights [B, 27, D, H, W] (offset (i, j, k) at index 9 i + 3 j + k) for every channel."""
    d, h, w = x.shape[-3:]
    for _ in range(times):
        p = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(x)
        for n, (i, j, k) in enumerate(itertools.product(range(3), repeat=3)):
            out = out + p[:, :, i:i + d, j:j + h, k:k + w] * weights[:, n:n + 1]
        x = out
    return x


def _adaptive_head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv3d(channels, 27, 3, padding=1, bias=False))


def patch_starts(resolution: int, patch: int, patches: int = 3) -> list[int]:
    """Offsets of ``patches`` patches of side ``patch`` covering [0, resolution) with equal overlaps."""
    if patches == 1:
        if patch != resolution:
            raise ValueError(f"one patch must cover the grid: patch {patch} != resolution {resolution}")
        return [0]
    stride, rem = divmod(resolution - patch, patches - 1)
    if rem or stride <= 0 or stride > patch:
        raise ValueError(f"{patches} patches of {patch} cannot tile {resolution} with equal overlaps")
    return [i * stride for i in range(patches)]


def blend_weights(resolution: int, starts: list[int], patch: int, dtype=torch.float32) -> list[torch.Tensor]:
    """1-D weights [patch] of every patch: 1 where it alone covers, linear ramps linspace(0, 1, overlap)
    across each overlap (the official XL blending; separable, so the 3-D weight is their outer product)."""
    out = []
    for i, s in enumerate(starts):
        w = torch.ones(patch, dtype=dtype)
        if i > 0:
            o = starts[i - 1] + patch - s
            w[:o] = torch.linspace(0, 1, o, dtype=dtype)
        if i + 1 < len(starts):
            o = s + patch - starts[i + 1]
            w[patch - o:] = 1 - torch.linspace(0, 1, o, dtype=dtype)
        out.append(w)
    return out


def scatter_patch(x: SparseTensor, batch: int, lo: tuple[int, int, int], size: int, fill: float,
                  device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The voxels of sample ``batch`` of x inside the box [lo, lo + size)³ as a dense [C, size³] grid (``fill`` elsewhere)."""
    c = x.coords
    rel = c[:, 1:].long() - torch.tensor(lo, device=c.device)
    keep = (c[:, 0] == batch) & (rel >= 0).all(1) & (rel < size).all(1)
    rel, feats = rel[keep].to(device), x.feats[keep].to(device=device, dtype=dtype)
    grid = torch.full((feats.shape[1], size, size, size), fill, device=device, dtype=dtype)
    grid[:, rel[:, 0], rel[:, 1], rel[:, 2]] = feats.t()
    return grid


class VoxelRefiner(nn.Module):
    """Official ``Voxel_RefinerXL``: dense SDF (conv_in 1->8) + decoder features (``latent_mlp`` 32->8) -> UNet
    -> adaptive smoothing 1 -> mid_conv -> adaptive 2 -> conv_out -> adaptive 3 (weights from the 8-channel
    feature) -> tanh. forward(sdf [B, 1, P³], feats [B, 32, P³]) -> [B, 1, P³]."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, layers_per_block: int = 2, layers_mid_block: int = 2,
                 patch_size: int = 192, feature_channels: int = 32, channels: tuple[int, ...] = UNET_CHANNELS):
        super().__init__()
        width = channels[0]
        self.unet3d1 = UNet3D(2 * width, channels, layers_per_block, layers_mid_block)
        self.conv_in = nn.Conv3d(in_channels, width, 3, padding=1)
        self.latent_mlp = GeoDecoder(feature_channels, feature_channels, 4, width)
        self.adaptive_conv1, self.adaptive_conv2, self.adaptive_conv3 = (_adaptive_head(width) for _ in range(3))
        self.mid_conv = nn.Conv3d(width, width, 3, padding=1)
        self.conv_out = nn.Conv3d(width, out_channels, 3, padding=1)
        self.patch_size = patch_size

    def forward(self, sdf: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        lat = self.latent_mlp(feats.movedim(1, -1)).movedim(-1, 1)
        h = self.unet3d1(torch.cat([self.conv_in(sdf), lat], 1))
        h = adaptive_smooth(h, F.normalize(self.adaptive_conv1(h), p=1, dim=1))
        h = self.mid_conv(h)
        h = adaptive_smooth(h, F.normalize(self.adaptive_conv2(h), p=1, dim=1))
        out = adaptive_smooth(self.conv_out(h), F.normalize(self.adaptive_conv3(h), p=1, dim=1))
        return torch.tanh(out)

    @torch.no_grad()
    def refine(self, sdf: SparseTensor, feats: SparseTensor, resolution: int, patches: int = 3,
               grid_device: str | torch.device = "cpu") -> torch.Tensor:
        """Decoded sparse SDF [N, 1] and features [N, 32] at fine ``resolution`` -> refined dense SDF
        [B, R, R, R] float32 on ``grid_device`` (inactive voxels enter as +1, official)."""
        p = self.patch_size
        starts = patch_starts(resolution, p, patches)
        ramps = blend_weights(resolution, starts, p)
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype
        out = torch.zeros(sdf.batch_size, resolution, resolution, resolution, device=grid_device)
        for b in range(sdf.batch_size):
            for (i, x0), (j, y0), (k, z0) in itertools.product(enumerate(starts), repeat=3):
                lo = (x0, y0, z0)
                s = scatter_patch(sdf, b, lo, p, 1.0, dev, dt)[None]
                f = scatter_patch(feats, b, lo, p, 0.0, dev, dt)[None]
                y = self(s, f)[0, 0].float().to(grid_device)
                w = ramps[i][:, None, None] * ramps[j][None, :, None] * ramps[k][None, None, :]
                out[b, x0:x0 + p, y0:y0 + p, z0:z0 + p] += w.to(grid_device) * y
        return out


class SignRefiner(nn.Module):
    """Official ``Voxel_RefinerXL_sign``: conv_in 1->8 -> UNet -> conv_out 8->1 -> sigmoid >= 0.5 gives +1
    (outside), else -1. forward(sdf [B, 1, P³]) -> sign [B, 1, P³]."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, layers_per_block: int = 2, layers_mid_block: int = 2,
                 patch_size: int = 256, channels: tuple[int, ...] = UNET_CHANNELS):
        super().__init__()
        width = channels[0]
        self.unet3d1 = UNet3D(width, channels, layers_per_block, layers_mid_block)
        self.conv_in = nn.Conv3d(in_channels, width, 3, padding=1)
        self.conv_out = nn.Conv3d(width, out_channels, 3, padding=1)
        self.patch_size = patch_size

    def logits(self, sdf: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.unet3d1(self.conv_in(sdf)))

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.sigmoid(self.logits(sdf).float()) >= 0.5, 1.0, -1.0)

    @torch.no_grad()
    def refine(self, sdf: SparseTensor, resolution: int, patches: int = 3,
               grid_device: str | torch.device = "cpu") -> torch.Tensor:
        """Decoded sparse SDF [N, 1] at fine ``resolution`` -> dense SDF [B, R, R, R] float32 on ``grid_device``:
        |sdf| (+1 where inactive) times the sign predicted on the 2x mean-pooled grid, decoded values kept
        on the active voxels."""
        half = resolution // 2
        coarse, _ = mean_pool(sdf, 2)
        p = self.patch_size
        dev, dt = next(self.parameters()).device, next(self.parameters()).dtype
        sign = torch.ones(sdf.batch_size, half, half, half, device=grid_device)
        for b in range(sdf.batch_size):
            for x0, y0, z0 in itertools.product(patch_starts(half, p, patches), repeat=3):
                s = scatter_patch(coarse, b, (x0, y0, z0), p, 1.0, dev, dt)[None]
                sign[b, x0:x0 + p, y0:y0 + p, z0:z0 + p] = self(s)[0, 0].to(grid_device)
        out = sign.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)
        c = sdf.coords.long().to(grid_device)
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = sdf.feats[:, 0].float().to(grid_device)
        return out
