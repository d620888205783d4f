"""Rectified flow: path, sampler exactness on a linear flow, shift, CFG, condition dropout, timesteps."""
import math

import pytest
import torch

from d3ds2.flow import FlowSampler, TimestepSampler, drop_conditions, guided_velocity, interpolate, null_condition, shifted_sigmas, velocity_target
from d3ds2.flow.guidance import cat_batches
from d3ds2.models.dit_layers import SparseCondition
from d3ds2.sparse import SparseTensor


def test_path_endpoints_and_velocity():
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, 1, dtype=torch.float64)
    xt = interpolate(x0, eps, t)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros_like(t)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones_like(t)), eps)
    h = 1e-6  # the target is the time derivative of the path
    torch.testing.assert_close((interpolate(x0, eps, t + h) - xt) / h, velocity_target(x0, eps), atol=1e-6, rtol=1e-6)


def test_shifted_sigmas_formula():
    s = shifted_sigmas(50, 6.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s.diff() < 0)
    lin = torch.linspace(1, 0, 51, dtype=torch.float64)
    torch.testing.assert_close(s, 6 * lin / (1 + 5 * lin))
    assert abs(float(shifted_sigmas(50, 6.0)[1]) - 0.9966) < 1e-3  # the official schedule's second sigma


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 6.0), (15, 8.0)])
def test_euler_integrates_linear_flow_exactly(steps, shift):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(4, 6, generator=gen, dtype=torch.float64)
    seen = []

    def velocity(x, t, w):  # the exact velocity field of the straight path from eps (t=1) to x0 (t=0)
        seen.append(t.clone())
        return eps - x0

    out = FlowSampler(steps, shift).sample(velocity, eps, batch_size=4)
    torch.testing.assert_close(out, x0)
    assert len(seen) == steps and seen[0].shape == (4,) and float(seen[0][0]) == 1000.0


def test_cfg_guidance_one_equals_conditional_and_combination():
    gen = torch.Generator().manual_seed(1)
    w_lin = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return x @ w_lin + c.mean(1)[:, :3] * t[:, None] / 1000

    x, t = torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.tensor([300.0, 900.0], dtype=torch.float64)
    cond = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    uncond = null_condition(cond)
    torch.testing.assert_close(guided_velocity(model, x, t, cond, uncond, 1.0), model(x, t, cond))
    calls.clear()
    out = guided_velocity(model, x, t, cond, uncond, 7.0)
    assert calls == [4]  # one batched forward for cond + uncond
    ref = model(x, t, uncond) + 7.0 * (model(x, t, cond) - model(x, t, uncond))
    torch.testing.assert_close(out, ref)


def test_guidance_interval():
    s = FlowSampler(10, 1.0, guidance=5.0, guidance_interval=(0.2, 0.8))
    assert s.guidance_at(0.5) == 5.0 and s.guidance_at(0.9) == 1.0 and s.guidance_at(0.1) == 1.0


def test_sparse_cat_batches_keeps_samples():
    coords = [torch.randint(0, 8, (n, 3)).unique(dim=0) for n in (6, 4)]
    x = SparseTensor.from_samples([torch.randn(len(c), 2) for c in coords], coords)
    xx = cat_batches(x, x)
    assert xx.batch_size == 4 and torch.equal(xx.feats, torch.cat([x.feats, x.feats]))
    SparseTensor(xx.feats, xx.coords, 4)  # validates order and uniqueness
    c = SparseCondition(torch.randn(5, 3), torch.zeros(5, 3, dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32))
    cc = cat_batches(c, null_condition(c))
    assert cc.offsets.tolist() == [0, 2, 5, 7, 10] and torch.equal(cc.feats[5:], torch.zeros(5, 3))


@pytest.mark.parametrize("sparse", [False, True])
def test_condition_dropout_rate(sparse):
    n, p = 20000, 0.1
    gen = torch.Generator().manual_seed(2)
    if sparse:
        counts = torch.randint(1, 4, (n,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        cond = SparseCondition(torch.rand(int(counts.sum()), 2) + 0.5, torch.zeros(int(counts.sum()), 3), offsets)
    else:
        cond = torch.rand(n, 3, 2) + 0.5
    out, dropped = drop_conditions(cond, p, generator=gen)
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    feats = out.feats if sparse else out.reshape(-1, 2)
    bid = cond.batch_ids if sparse else torch.arange(n).repeat_interleave(3)
    zero = (feats == 0).all(1)
    assert torch.equal(zero, dropped[bid])  # exactly the dropped samples are zeroed


def test_timestep_sampler_logit_normal_and_uniform():
    gen = torch.Generator().manual_seed(3)
    t = TimestepSampler("logit_normal", mean=1.0, std=1.0)(50000, generator=gen)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 1.0) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    u = TimestepSampler("uniform")(50000, generator=gen)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown kind"):
        TimestepSampler("cosine")
