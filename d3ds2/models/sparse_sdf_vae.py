"""Sparse SDF VAE (Direct3D-S2): fine sparse SDF (R³) <-> sparse latent (R/8)³ with 16 channels.

Encoder: Linear 1->32 on the input voxels, three residual down blocks (mean pool ×2 each), Linear, absolute
PE on the latent coords, windowed (Swin-style, shifts 0/window/2) transformer blocks, LN, Linear -> [mean, logvar].
Decoder: Linear 16->C, PE, transformer blocks, three subdivide blocks (every latent cell -> all 8³ fine
voxels, or fewer with the optional occupancy/pruning head), Linear -> tanh SDF in (-1, 1).

The default sizes are the official v1.1 ones (37.87M parameters); parameter names follow the official
checkpoint (see docs/vae.md for the converter map).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..sparse import SparseLayerNorm, SparseLinear, SparseTensor, pack_keys, prune
from .embeddings import AbsolutePositionEmbedder
from .sparse_blocks import SparseResDownBlock, SparseSubdivideBlock, SparseTransformerBlock


class DiagonalGaussian:
    """Diagonal Gaussian posterior on sparse feats: mean/logvar SparseTensors [N, C] on the latent voxels."""

    def __init__(self, params: SparseTensor) -> None:
        feats = params.feats.float() if params.feats.dtype in (torch.float16, torch.bfloat16) else params.feats
        mean, logvar = feats.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.mean = params.replace(mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> SparseTensor:
        noise = torch.randn(self.mean.feats.shape, generator=generator, device=self.std.device, dtype=self.std.dtype)
        return self.mean.replace(self.mean.feats + self.std * noise)

    def mode(self) -> SparseTensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """0.5 · mean over latent voxels and channels of (mu² + var - logvar - 1) (KL to N(0, I)); scalar."""
        if self.mean.num_voxels == 0:
            return self.logvar.sum() * 0.0
        return 0.5 * (self.mean.feats.pow(2) + self.var - self.logvar - 1.0).mean()


def _transformer_blocks(channels, num_blocks, num_heads, mlp_ratio, attn_mode, window, use_checkpoint):
    """Blocks with window shifts alternating 0 and window // 2 (the official 'swin' mode)."""
    return nn.ModuleList(
        SparseTransformerBlock(
            channels, num_heads, mlp_ratio, attn_mode, window, shift=0 if i % 2 == 0 else window // 2,
            use_checkpoint=use_checkpoint,
        )
        for i in range(num_blocks)
    )


def _init_trunk(module: nn.Module) -> None:
    """Xavier-uniform Linear weights and zero biases (TRELLIS/official trunk init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SparseSDFEncoder(nn.Module):
    """[N, in_channels] fine voxels at R -> posterior params [M, 2·latent_channels] at R / 2^len(down)."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 128, 512),
        model_channels: int = 512,
        latent_channels: int = 16,
        num_blocks: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        attn_mode: str = "window",
        window: int = 8,
        pe_factor: float = 1.0,
        use_checkpoint: bool = False,
        init_logvar: float = -6.0,
    ) -> None:
        super().__init__()
        self.pe_factor = pe_factor
        self.input_layer1 = SparseLinear(in_channels, channels[0])
        self.downsample = nn.ModuleList(SparseResDownBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.input_layer = SparseLinear(channels[-1], model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.blocks = _transformer_blocks(model_channels, num_blocks, num_heads, mlp_ratio, attn_mode, window, use_checkpoint)
        self.out_norm = SparseLayerNorm(model_channels, elementwise_affine=False, eps=1e-5)
        self.out_layer = SparseLinear(model_channels, 2 * latent_channels)
        _init_trunk(self.input_layer)
        _init_trunk(self.blocks)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)
        # start with a narrow posterior (std e^(init_logvar/2)): with logvar 0 the latent is pure unit noise
        # and short runs learn nothing; the KL term widens it as training goes
        nn.init.constant_(self.out_layer.bias[latent_channels:], init_logvar)

    @property
    def factor(self) -> int:
        return 2 ** len(self.downsample)

    def forward(self, x: SparseTensor) -> DiagonalGaussian:
        h = self.input_layer1(x)
        for block in self.downsample:
            h = block(h)
        h = self.input_layer(h)
        pe = self.pos_embedder(h.coords[:, 1:].float() * self.pe_factor)
        h = h.replace(h.feats + pe.to(h.dtype))
        for block in self.blocks:
            h = block(h)
        return DiagonalGaussian(self.out_layer(self.out_norm(h)))


@dataclass
class DecoderOutput:
    """sdf: tanh SDF [N, 1] on the decoded fine voxels; feats: their last features [N, C_last];
    occupancy: per subdivision level, (logits [N_l] of its children, the children's coords [N_l, 4])."""

    sdf: SparseTensor
    feats: SparseTensor
    occupancy: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def occupancy_targets(child_coords: torch.Tensor, target_coords: torch.Tensor, scale: int) -> torch.Tensor:
    """bool [N]: child voxel (batch, c) holds a target fine voxel, i.e. some target t with t // scale == c."""
    t = torch.cat([target_coords[:, :1], torch.div(target_coords[:, 1:], scale, rounding_mode="floor")], 1)
    return torch.isin(pack_keys(child_coords), pack_keys(t))


class SparseSDFDecoder(nn.Module):
    """Latent [M, latent_channels] -> tanh SDF on the fine voxels (×2^len(channels) per axis).

    With ``occupancy_head`` each subdivision level predicts a logit per child and prunes children with
    logit <= 0 (in training, children that hold target voxels are always kept: see :meth:`upsample`).
    """

    def __init__(
        self,
        latent_channels: int = 16,
        model_channels: int = 512,
        channels: tuple[int, ...] = (128, 64, 32),
        out_channels: int = 1,
        num_blocks: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        attn_mode: str = "window",
        window: int = 8,
        pe_factor: float = 1.0,
        occupancy_head: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.pe_factor = pe_factor
        self.input_layer = SparseLinear(latent_channels, model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.blocks = _transformer_blocks(model_channels, num_blocks, num_heads, mlp_ratio, attn_mode, window, use_checkpoint)
        widths = (model_channels, *channels)
        self.upsample = nn.ModuleList(SparseSubdivideBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.occupancy = nn.ModuleList(SparseLinear(c, 1) for c in channels) if occupancy_head else None
        self.out_layer = SparseLinear(channels[-1], out_channels)
        _init_trunk(self.input_layer)
        _init_trunk(self.blocks)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    @property
    def factor(self) -> int:
        return 2 ** len(self.upsample)

    def trunk(self, z: SparseTensor) -> SparseTensor:
        """Latent -> transformer features [M, model_channels] on the latent voxels."""
        h = self.input_layer(z)
        pe = self.pos_embedder(h.coords[:, 1:].float() * self.pe_factor)
        h = h.replace(h.feats + pe.to(h.dtype))
        for block in self.blocks:
            h = block(h)
        return h

    def upsample_features(self, h: SparseTensor, target_coords: torch.Tensor | None = None) -> DecoderOutput:
        """Subdivision blocks + output layer on trunk features ``h``.

        target_coords: [T, 4] fine voxels that must be decoded (training with the occupancy head: the
        children holding them are kept whatever the prediction, so every target gets supervised).
        """
        occ = []
        for level, block in enumerate(self.upsample):
            h = block(h)
            if self.occupancy is not None:
                logits = self.occupancy[level](h).feats[:, 0].float()
                occ.append((logits, h.coords))
                keep = logits > 0
                if target_coords is not None:
                    keep = keep | occupancy_targets(h.coords, target_coords, 2 ** (len(self.upsample) - 1 - level))
                h = prune(h, keep)
        sdf = self.out_layer(h)
        return DecoderOutput(sdf.replace(torch.tanh(sdf.feats.float())), h, occ)

    def forward(self, z: SparseTensor, target_coords: torch.Tensor | None = None) -> DecoderOutput:
        return self.upsample_features(self.trunk(z), target_coords)


def chunk_ids(coords: torch.Tensor, chunk: int) -> torch.Tensor:
    """[N, 3] int64 chunk index (coords // chunk per axis) of latent coords [N, 4]."""
    return torch.div(coords[:, 1:].long(), chunk, rounding_mode="floor")


class SparseSDFVAE(nn.Module):
    """Encoder + decoder; defaults are the official v1.1 sizes (37.87M parameters).

    chunk_size / chunk_halo: in eval, decode the subdivision convs chunk by chunk over chunk_size³ latent
    cells with chunk_halo cells of context (3 suffice for an exact match of the unchunked decode);
    train_chunk: in training, decode only one random chunk of that many latent cells (the 1024 trick).
    init_logvar: initial posterior log-variance (bias of the logvar outputs; the official code starts at 0).
    """

    def __init__(
        self,
        in_channels: int = 1,
        latent_channels: int = 16,
        model_channels: int = 512,
        encoder_channels: tuple[int, ...] = (32, 64, 128, 512),
        decoder_channels: tuple[int, ...] = (128, 64, 32),
        num_blocks: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        attn_mode: str = "window",
        window: int = 8,
        pe_factor: float = 1.0,
        occupancy_head: bool = False,
        use_checkpoint: bool = False,
        chunk_size: int | None = None,
        chunk_halo: int = 3,
        train_chunk: int | None = None,
        init_logvar: float = -6.0,
    ) -> None:
        super().__init__()
        if len(encoder_channels) - 1 != len(decoder_channels):
            raise ValueError(
                f"encoder has {len(encoder_channels) - 1} down blocks but decoder {len(decoder_channels)} up blocks"
            )
        common = dict(num_blocks=num_blocks, num_heads=num_heads, mlp_ratio=mlp_ratio, attn_mode=attn_mode,
                      window=window, pe_factor=pe_factor, use_checkpoint=use_checkpoint)
        self.encoder = SparseSDFEncoder(in_channels, tuple(encoder_channels), model_channels, latent_channels,
                                        init_logvar=init_logvar, **common)
        self.decoder = SparseSDFDecoder(latent_channels, model_channels, tuple(decoder_channels), 1,
                                        occupancy_head=occupancy_head, **common)
        self.latent_channels = latent_channels
        self.chunk_size, self.chunk_halo, self.train_chunk = chunk_size, chunk_halo, train_chunk

    @property
    def factor(self) -> int:
        """Fine voxels per latent cell per axis (8)."""
        return self.encoder.factor

    def encode(self, x: SparseTensor, sample: bool = True) -> tuple[SparseTensor, DiagonalGaussian]:
        """x: fine input [N, 1] (normalised SDF) -> (latent [M, 16] at coords x // 8, posterior)."""
        post = self.encoder(x)
        return (post.sample() if sample else post.mode()), post

    def decode(self, z: SparseTensor, target_coords: torch.Tensor | None = None) -> DecoderOutput:
        """Latent -> fine SDF; chunked in eval when chunk_size is set, one random chunk in training when
        train_chunk is set, else in one piece."""
        h = self.decoder.trunk(z)
        if self.training and self.train_chunk:
            ids = chunk_ids(h.coords, self.train_chunk)
            pick = ids[torch.randint(ids.shape[0], (1,), device=ids.device)]
            return self._decode_region(h, ids, pick, target_coords)
        if not self.training and self.chunk_size:
            ids = chunk_ids(h.coords, self.chunk_size)
            parts = [self._decode_region(h, ids, c.view(1, 3), target_coords) for c in torch.unique(ids, dim=0)]
            return _concat_outputs(parts, z.batch_size)
        return self.decoder.upsample_features(h, target_coords)

    def _decode_region(self, h: SparseTensor, ids: torch.Tensor, chunk: torch.Tensor, target_coords) -> DecoderOutput:
        """Decode the latent cells of one chunk (ids == chunk), using chunk_halo cells of context around it."""
        size, halo = self.chunk_size or self.train_chunk, self.chunk_halo
        lo = chunk * size
        lat = h.coords[:, 1:].long()
        ctx = ((lat >= lo - halo) & (lat < lo + size + halo)).all(1)
        part = prune(h, ctx)
        out = self.decoder.upsample_features(part, target_coords)
        core = (chunk_ids(torch.div(out.sdf.coords, self.factor, rounding_mode="floor"), size) == chunk).all(1)
        return DecoderOutput(prune(out.sdf, core), prune(out.feats, core), out.occupancy)

    def forward(self, x: SparseTensor, sample: bool = True, target_coords: torch.Tensor | None = None):
        """-> (DecoderOutput, posterior)."""
        z, post = self.encode(x, sample)
        return self.decode(z, target_coords), post


def _concat_outputs(parts: list[DecoderOutput], batch_size: int) -> DecoderOutput:
    """Merge per-chunk outputs (disjoint voxel sets) into one sorted output."""
    coords = torch.cat([p.sdf.coords for p in parts])
    sdf = SparseTensor.from_unsorted(torch.cat([p.sdf.feats for p in parts]), coords, batch_size)
    feats = SparseTensor.from_unsorted(torch.cat([p.feats.feats for p in parts]), coords, batch_size)
    levels = zip(*(p.occupancy for p in parts))  # per subdivision level, the (logits, coords) of every chunk
    occupancy = [(torch.cat([o[0] for o in lv]), torch.cat([o[1] for o in lv])) for lv in levels]
    return DecoderOutput(sdf, feats, occupancy)
