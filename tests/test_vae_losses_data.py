"""VAE losses on hand-made cases, analytic samples, collation, token-budget batching, multires streams."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from d3ds2.data.batching import BudgetPacker, token_budget_batches
from d3ds2.data.sdf_transforms import SDFSample, analytic_sample, collate, normalise_sdf
from d3ds2.models.sparse_sdf_vae import DecoderOutput, DiagonalGaussian
from d3ds2.models.vae_losses import VAELossWeights, vae_loss
from d3ds2.sparse import SparseTensor
from d3ds2.training.vae_datamodule import AnalyticSource, VAEBatchStream


def _targets(values, in_band, sharp):
    n = len(values)
    coords = torch.tensor([[0, i, 0, 0] for i in range(n)], dtype=torch.int32)
    feats = torch.tensor([values, in_band, sharp], dtype=torch.float32).t()
    return SparseTensor(feats, coords)


def _posterior(mean, logvar):
    coords = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    return DiagonalGaussian(SparseTensor(torch.tensor([mean + logvar]), coords))


def test_loss_terms_by_hand():
    t = _targets([0.1, -0.2, 0.9, 1.0, 0.0], [1, 1, 0, 0, 1], [1, 0, 0, 0, 0])
    # decoded: voxels 0, 1, 2 and 7 (7 is not a target voxel: ignored); 3 and 4 not decoded
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 7, 0, 0]], dtype=torch.int32)
    pred = SparseTensor(torch.tensor([[0.3], [-0.2], [0.5], [0.0]]), coords)
    out = DecoderOutput(pred, pred)
    post = _posterior([1.0, 0.0], [0.0, np.log(2.0)])
    w = VAELossWeights()
    loss, terms = vae_loss(out, post, t, w)
    assert terms["in"].item() == pytest.approx((0.2 + 0.0) / 2)  # mean over decoded in-band voxels
    assert terms["ext"].item() == pytest.approx(0.4)
    assert terms["sharp"].item() == pytest.approx(0.2)
    kl = 0.5 * ((1 + 1 - 0 - 1) + (0 + 2 - np.log(2.0) - 1)) / 2
    assert terms["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 + 0.1 * 0.4 + 0.2 + 1e-3 * kl)
    _, terms2 = vae_loss(out, post, t, VAELossWeights(kind="l2"))
    assert terms2["in"].item() == pytest.approx(0.04 / 2) and terms2["ext"].item() == pytest.approx(0.16)
    with pytest.raises(ValueError, match="l1"):
        vae_loss(out, post, t, VAELossWeights(kind="huber"))


def test_empty_sets_give_zero_not_nan():
    t = _targets([0.5], [1], [0])
    empty = SparseTensor(torch.zeros(0, 1), torch.zeros(0, 4, dtype=torch.int32), batch_size=1)
    post = DiagonalGaussian(SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), batch_size=1))
    loss, terms = vae_loss(DecoderOutput(empty, empty), post, t, VAELossWeights())
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_occupancy_loss_is_bce_per_level():
    t = SparseTensor(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0, 3, 0, 0]], dtype=torch.int32))
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)  # children at scale 2 of the last-but-one level
    logits = torch.tensor([2.0, -1.0])
    pred = SparseTensor(torch.zeros(1, 1), torch.tensor([[0, 3, 0, 0]], dtype=torch.int32))
    out = DecoderOutput(pred, pred, [(logits, coords), (torch.tensor([0.5]), torch.tensor([[0, 3, 0, 0]], dtype=torch.int32))])
    _, terms = vae_loss(out, _posterior([0.0], [0.0]), t, VAELossWeights())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    ref = bce(logits, torch.tensor([0.0, 1.0])) + bce(torch.tensor([0.5]), torch.tensor([1.0]))
    assert terms["occ"].item() == pytest.approx(ref.item())


@pytest.mark.parametrize("shape,params,fn", [
    ("sphere", {"radius": 0.5}, lambda p: p.norm(dim=1) - 0.5),
    ("box", {"half": 0.4}, lambda p: (p.abs() - 0.4).clamp_min(0).norm(dim=1) + (p.abs() - 0.4).max(1).values.clamp_max(0)),
])
def test_analytic_sample_matches_sdf_and_layout(shape, params, fn):
    R = 32
    s = analytic_sample(shape, R, band=3.0, trunc=6.0, **params)
    p = -1 + (s.coords.double() + 0.5) * 2 / R
    exact = (fn(p) / (2 / R)).clamp(-6, 6)
    torch.testing.assert_close(s.sdf.double(), exact, atol=1e-5, rtol=0)
    assert torch.equal(s.in_band, exact.abs() < 3.0)
    cells = torch.unique(s.coords // 8, dim=0)
    assert cells.shape[0] * 512 == len(s)  # complete 8³ cells
    assert (s.sdf < 0).any() and (s.sdf > 0).any()
    assert s.sharp.any() == (shape == "box")


def test_multires_resampling_matches_analytic_sdf():
    """Resampling a stored sparse SDF (data-prep routine) to another R agrees with the analytic SDF at R."""
    from d3ds2.data.sdf_transforms import sample_at_resolution

    src = analytic_sample("sphere", 64, radius=0.55)
    cells = torch.unique(src.coords // 8, dim=0)
    blocks = torch.zeros(cells.shape[0], 8, 8, 8)
    sharp = torch.zeros(cells.shape[0], 8, 8, 8, dtype=torch.bool)
    inv = torch.unique(src.coords // 8, dim=0, return_inverse=True)[1]
    c = src.coords.long() % 8
    blocks[inv, c[:, 0], c[:, 1], c[:, 2]] = src.sdf
    sample = {"key": "sphere", "sdf": {64: {"cells": cells.int().numpy(), "sdf": blocks.numpy(),
                                            "sharp": sharp.numpy(), "band": 4.0, "trunc": 7.9375}}}
    for R in (48, 32):
        got = sample_at_resolution(sample, R)
        p = -1 + (got.coords.double() + 0.5) * 2 / R
        exact = (p.norm(dim=1) - 0.55) / (2 / R)
        near = exact.abs() < 4 * R / 64 - 0.5  # where the stored band (4 source voxels) resolves every corner
        err = (got.sdf.double() - exact)[near].abs()
        assert err.max() < 0.15, f"R={R}: max error {err.max():.3f} voxels"  # trilinear error of a smooth SDF
        far = exact.abs() > 0.5
        assert (torch.sign(got.sdf.double()[far]) == torch.sign(exact[far])).all()  # no sign flips anywhere
        assert got.resolution == R and got.in_band.any()


def test_collate_builds_inputs_and_targets():
    a, b = analytic_sample("sphere", 16, radius=0.5), analytic_sample("torus", 16)
    batch = collate([a, b], 8.0)
    assert batch.inputs.num_voxels == a.num_input_voxels + b.num_input_voxels
    assert batch.targets.num_voxels == len(a) + len(b)
    assert batch.inputs.feats.abs().max() <= 0.5  # in-band |sdf| < 4 voxels -> < 0.5 after / 8
    torch.testing.assert_close(batch.targets.feats[:, 0].abs().max(), normalise_sdf(a.sdf, 8.0).abs().max())
    with pytest.raises(ValueError, match="different resolutions"):
        collate([a, analytic_sample("sphere", 24)], 8.0)


def test_collate_defers_the_voxel_sort_to_the_batch_device():
    """Shuffled samples: the worker only concatenates; inputs/targets sort after .to(device) and equal
    SparseTensor.from_samples of the same samples."""
    gen = torch.Generator().manual_seed(3)
    samples = []
    for shape in ("box", "torus"):
        s = analytic_sample(shape, 16)
        perm = torch.randperm(len(s), generator=gen)
        samples.append(SDFSample(s.coords[perm], s.sdf[perm], s.in_band[perm], s.sharp[perm], s.resolution, shape))
    batch = collate(samples, 8.0)
    assert not batch._sorted  # nothing sorted in the worker
    moved = batch.to("cpu")
    norm = [normalise_sdf(s.sdf, 8.0) for s in samples]
    ref = SparseTensor.from_samples([torch.stack([n, s.in_band.float(), s.sharp.float()], 1)
                                     for n, s in zip(norm, samples)], [s.coords for s in samples])
    assert torch.equal(moved.targets.coords, ref.coords) and torch.equal(moved.targets.feats, ref.feats)
    assert bool((moved.inputs.keys.diff() > 0).all()) and moved.inputs.batch_size == 2
    assert moved.num_voxels == ref.num_voxels and moved.names == ["box", "torus"]


def test_token_budget_batching(caplog):
    sizes = [3, 4, 2, 9, 11, 1, 5, 0]
    with caplog.at_level(logging.WARNING):
        batches = list(token_budget_batches(sizes, 10, lambda n: n))
    assert batches == [[3, 4, 2], [9, 1], [5]]
    assert all(sum(b) <= 10 for b in batches)
    assert "dropping" in caplog.text  # 11 (over budget) and 0 (empty)
    assert list(token_budget_batches([1, 1, 1], 10, lambda n: n, max_items=2)) == [[1, 1], [1]]
    with pytest.raises(ValueError):
        BudgetPacker(0)


def test_multires_stream_budget_resolution_and_determinism(caplog):
    src = AnalyticSource(["sphere", "box", "torus"])
    stream = VAEBatchStream(src, [16, 24, 32], batch_voxels=40_000, max_samples=4, sdf_scale=8.0, seed=3)
    it = iter(stream)
    batches = [next(it) for _ in range(6)]
    assert {b.resolution for b in batches} <= {16, 24, 32} and len({b.resolution for b in batches}) > 1
    assert all(b.num_voxels <= 40_000 for b in batches)
    again = iter(VAEBatchStream(src, [16, 24, 32], 40_000, 4, 8.0, seed=3, start=4))
    b4 = next(again)
    assert b4.resolution == batches[4].resolution and torch.equal(b4.targets.coords, batches[4].targets.coords)


def test_sample_without_voxels_is_dropped(caplog):
    class Tiny(AnalyticSource):
        def stream(self, seed):
            yield from ["empty", "sphere", "empty", "sphere"]

        def at_resolution(self, item, resolution):
            if item == "empty":
                z = torch.zeros(0, dtype=torch.bool)
                return SDFSample(torch.zeros(0, 3, dtype=torch.int32), torch.zeros(0), z, z, resolution, "empty")
            return super().at_resolution(item, resolution)

    stream = VAEBatchStream(Tiny(["empty", "sphere"]), [16], 10_000, 2, 8.0, seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(stream))
    assert batch.names and all(n == "sphere" for n in batch.names)
    assert "no voxel at resolution 16" in caplog.text
