"""Dense occupancy VAE of the index stage (TRELLIS sparse-structure VAE layout, Direct3D-S2 sizes).

Occupancy grid [B, 1, 64, 64, 64] in {0, 1} (fed as +-1) -> latent [B, 8, 16, 16, 16] -> occupancy logits
[B, 1, 64, 64, 64]. Conv3d ResBlocks with channel-wise LayerNorm; encoder channels [32, 128, 512] with 2
blocks per stage, decoder [512, 128, 64] with 4 blocks per stage (official: 193.04M parameters).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of [B, C, ...] tensors, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = x.movedim(1, -1)
        h = h if h.dtype == torch.float64 else h.float()
        h = F.layer_norm(h, self.normalized_shape, self.weight.to(h.dtype), self.bias.to(h.dtype), self.eps)
        return h.movedim(-1, 1).to(x.dtype)


class ResBlock3d(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> conv3 (zero init) + skip (1x1 conv when channels change)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = ChannelLayerNorm(channels, eps=1e-6)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = ChannelLayerNorm(out_channels, eps=1e-6)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Strided conv, kernel = stride = 2."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C r^3, D, H, W] -> [B, C, D r, H r, W r]."""
    b, c, d, h, w = x.shape
    c_out = c // factor**3
    x = x.view(b, c_out, factor, factor, factor, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c_out, d * factor, h * factor, w * factor)


class UpsampleBlock3d(nn.Module):
    """conv3 to 8 x out channels, then a 3D pixel shuffle x2."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _stages(channels: list[int], blocks_per_stage: int, up: bool) -> nn.ModuleList:
    layers: list[nn.Module] = []
    for i, c in enumerate(channels):
        layers += [ResBlock3d(c) for _ in range(blocks_per_stage)]
        if i + 1 < len(channels):
            layers.append((UpsampleBlock3d if up else DownsampleBlock3d)(c, channels[i + 1]))
    return nn.ModuleList(layers)


class _Coder(nn.Module):
    def __init__(self, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint

    def _run(self, layers, h):
        for layer in layers:
            h = checkpoint(layer, h, use_reentrant=False) if self.use_checkpoint and torch.is_grad_enabled() else layer(h)
        return h


class OccupancyEncoder(_Coder):
    """[B, 1, R, R, R] -> [B, 2 latent_channels, R/4, R/4, R/4] (mean, logvar)."""

    def __init__(self, latent_channels=8, channels=(32, 128, 512), blocks_per_stage=2, middle_blocks=2, use_checkpoint=False):
        super().__init__(use_checkpoint)
        self.input_layer = nn.Conv3d(1, channels[0], 3, padding=1)
        self.blocks = _stages(list(channels), blocks_per_stage, up=False)
        self.middle_block = nn.ModuleList(ResBlock3d(channels[-1]) for _ in range(middle_blocks))
        self.out_layer = nn.Sequential(
            ChannelLayerNorm(channels[-1], eps=1e-6), nn.SiLU(), nn.Conv3d(channels[-1], 2 * latent_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._run(self.blocks, self.input_layer(x))
        return self.out_layer(self._run(self.middle_block, h))


class OccupancyDecoder(_Coder):
    """[B, latent_channels, r, r, r] -> occupancy logits [B, 1, 4r, 4r, 4r]."""

    def __init__(self, latent_channels=8, channels=(512, 128, 64), blocks_per_stage=4, middle_blocks=4, use_checkpoint=False):
        super().__init__(use_checkpoint)
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.ModuleList(ResBlock3d(channels[0]) for _ in range(middle_blocks))
        self.blocks = _stages(list(channels), blocks_per_stage, up=True)
        self.out_layer = nn.Sequential(ChannelLayerNorm(channels[-1], eps=1e-6), nn.SiLU(), nn.Conv3d(channels[-1], 1, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._run(self.middle_block, self.input_layer(z))
        return self.out_layer(self._run(self.blocks, h))


class DenseShapeVAE(nn.Module):
    """Occupancy VAE: encode(occ [B,1,R,R,R] in {0,1}) -> (mean, logvar) [B, 8, R/4...]; decode(z) -> logits."""

    def __init__(
        self,
        latent_channels: int = 8,
        encoder_channels: tuple[int, ...] = (32, 128, 512),
        decoder_channels: tuple[int, ...] = (512, 128, 64),
        encoder_blocks: int = 2,
        decoder_blocks: int = 4,
        encoder_middle_blocks: int = 2,
        decoder_middle_blocks: int = 4,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.downsample = 2 ** (len(encoder_channels) - 1)
        self.encoder = OccupancyEncoder(latent_channels, tuple(encoder_channels), encoder_blocks, encoder_middle_blocks, use_checkpoint)
        self.decoder = OccupancyDecoder(latent_channels, tuple(decoder_channels), decoder_blocks, decoder_middle_blocks, use_checkpoint)

    def encode(self, occupancy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """occupancy [B, 1, R, R, R] (0/1, any dtype) -> mean, logvar [B, latent, R/4, R/4, R/4]."""
        if occupancy.dim() != 5 or occupancy.shape[1] != 1:
            raise ValueError(f"DenseShapeVAE.encode: expected occupancy [B, 1, R, R, R], got {tuple(occupancy.shape)}")
        mean, logvar = self.encoder(occupancy.float() * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent, r, r, r] -> occupancy logits [B, 1, 4r, 4r, 4r]."""
        return self.decoder(z)

    @torch.no_grad()
    def decode_coords(self, z: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
        """Occupied cells (sigmoid(logit) >= threshold) as int32 rows (batch, x, y, z), sorted."""
        occ = torch.sigmoid(self.decode(z).float())[:, 0] >= threshold
        return occ.nonzero().int()
