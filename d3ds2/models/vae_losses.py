"""Sparse SDF VAE losses (definitions in docs/vae.md).

All SDF terms compare the decoder's tanh output with the normalised target clamp(sdf_vox / sdf_scale, -1, 1)
on decoded voxels matched to target voxels by coordinate:
- L_in: mean |err| (or err²) over decoded voxels that are input (in-band) voxels;
- L_ext: the same over decoded voxels outside the input band (the extra voxels of the 8³ latent cells);
- L_sharp: the same over decoded voxels flagged near a sharp edge (they are also counted in L_in/L_ext);
- L_kl: 0.5 · mean over latent voxels and channels of (mu² + var - logvar - 1);
- L_occ (occupancy head only): BCE of each subdivision level's child logits vs "child holds an in-band voxel",
  mean over the children of each level, summed over levels.
Each mean is over the voxels of its set in the whole batch; an empty set contributes 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sparse import SparseTensor
from ..sparse.coords import lookup
from .sparse_sdf_vae import DecoderOutput, DiagonalGaussian, occupancy_targets


@dataclass
class VAELossWeights:
    w_in: float = 1.0
    w_ext: float = 0.1
    w_sharp: float = 1.0
    w_kl: float = 1e-3
    w_occ: float = 1.0
    kind: str = "l1"  # 'l1' or 'l2' for the SDF terms


def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    return (err * mask).sum() / n.clamp_min(1)


def match_targets(decoded: SparseTensor, targets: SparseTensor) -> torch.Tensor:
    """Row of each decoded voxel in ``targets`` (sorted) or -1 where the target set lacks it. [N_dec]."""
    return lookup(targets.keys, decoded.keys)


def vae_loss(
    out: DecoderOutput, posterior: DiagonalGaussian, targets: SparseTensor, weights: VAELossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """targets: feats [N, 3] = (normalised sdf, in_band, sharp) on every voxel of the occupied cells.

    Returns (weighted total, {in, ext, sharp, kl[, occ], decoded_voxels}).
    """
    if weights.kind not in ("l1", "l2"):
        raise ValueError(f"loss kind must be 'l1' or 'l2', got {weights.kind!r}")
    idx = match_targets(out.sdf, targets)
    found = idx >= 0
    t = targets.feats[idx.clamp_min(0)].float()
    diff = out.sdf.feats[:, 0].float() - t[:, 0]
    err = diff.abs() if weights.kind == "l1" else diff.pow(2)
    in_band = found & (t[:, 1] > 0.5)
    terms = {
        "in": _masked_mean(err, in_band),
        "ext": _masked_mean(err, found & ~in_band),
        "sharp": _masked_mean(err, found & (t[:, 2] > 0.5)),
        "kl": posterior.kl(),
    }
    total = weights.w_in * terms["in"] + weights.w_ext * terms["ext"] + weights.w_sharp * terms["sharp"]
    total = total + weights.w_kl * terms["kl"]
    if out.occupancy:
        band = targets.coords[targets.feats[:, 1] > 0.5]
        levels = len(out.occupancy)
        occ = sum(
            F.binary_cross_entropy_with_logits(logits, occupancy_targets(coords, band, 2 ** (levels - 1 - i)).float())
            for i, (logits, coords) in enumerate(out.occupancy)
        )
        terms["occ"] = occ
        total = total + weights.w_occ * occ
    terms["decoded_voxels"] = torch.tensor(float(out.sdf.num_voxels))
    return total, terms
