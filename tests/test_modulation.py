"""adaLN modulation kernels (Triton; the interpreter on CPU) against their float64 PyTorch definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d3ds2.kernels.modulation import (gated_residual, gated_residual_reference, modulated_layer_norm,
                                modulated_layer_norm_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(gen, counts, c):
    """Rows packed by sample (an empty sample and a 1-row sample included), per-sample rows [B, 3C]."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).int()
    x = torch.randn(ids.numel(), c, generator=gen, dtype=torch.float64) * 3 + 1
    mods = torch.randn(len(counts), 3 * c, generator=gen, dtype=torch.float64)
    return ids, x, mods


def _grads(fn, *tensors):
    """Outputs and input gradients of sum(fn(*tensors) * w) for a fixed random w."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    (out.double() * w.double()).sum().backward()
    return [out] + [t.grad for t in leaves]


def _close(a, b, tol):
    a, b = a.double().cpu(), b.double().cpu()
    err = (a - b).norm() / b.norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def _check_block(gen, counts, c, affine=False):
    """Modulated LayerNorm (then, with ``affine``, an affine LayerNorm) -> gated residual: the Triton kernels
    in float32 against the float64 reference, output and gradients of x, the modulation rows and h."""
    ids, x, mods = _batch(gen, counts, c)
    h = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def block(backend, dev, dtype):
        def fn(x, mods, h):
            shift, scale, gate = mods.chunk(3, dim=1)
            i = ids.to(dev)
            y = modulated_layer_norm(x, shift, scale, i, 1e-6, backend=backend)
            if affine:
                y = modulated_layer_norm(y, shift[:1], scale[:1], None, 1e-6, one=0.0, backend=backend)
            return gated_residual(x, y * h, gate, i, backend=backend)
        return _grads(fn, x.to(dev, dtype), mods.to(dev, dtype), h.to(dev, dtype))

    ref = block("torch", "cpu", torch.float64)
    for out, r in zip(block("triton", DEVICE, torch.float32), ref):
        _close(out, r, 1e-5)


@pytest.mark.parametrize("c,counts", [(48, [5, 1, 20, 0, 9]), (32, [3]), (72, [40, 13])])
def test_modulated_layer_norm_and_gated_residual_match_float64(gen, c, counts):
    _check_block(gen, counts, c)


@pytest.mark.parametrize("programs_per_sm", [1, 3])
def test_backward_sums_samples_across_the_tiles_of_a_program(gen, monkeypatch, programs_per_sm):
    """4-row tiles, several per program: per-sample gradient sums carried across tiles, samples that change
    inside a tile and between tiles, an empty sample; also without batch_ids (every row one sample)."""
    import d3ds2.kernels.modulation as mod

    monkeypatch.setattr(mod, "_bwd_tiles", lambda c: (4, mod.triton.next_power_of_2(c), 4))
    monkeypatch.setattr(mod, "BWD_PROGRAMS_PER_SM", programs_per_sm)
    _check_block(gen, [5, 1, 20, 0, 9], 24, affine=True)


def test_reference_is_layer_norm_with_per_sample_modulation(gen):
    ids, x, mods = _batch(gen, [4, 7], 16)
    shift, scale, _ = mods.chunk(3, dim=1)
    y = modulated_layer_norm_reference(x, shift, scale, ids)
    for b, rows in enumerate((slice(0, 4), slice(4, 11))):
        expected = F.layer_norm(x[rows], (16,), eps=1e-6) * (1 + scale[b]) + shift[b]
        torch.testing.assert_close(y[rows], expected)
    gate = mods[:, :16]
    torch.testing.assert_close(gated_residual_reference(x, y, gate, ids), x + y * gate[ids.long()])


def test_affine_layer_norm_without_batch_ids_matches_torch(gen):
    x = torch.randn(37, 40, generator=gen)
    weight, bias = torch.randn(40, generator=gen), torch.randn(40, generator=gen)

    def fn(backend):
        def f(x, w, b):
            return modulated_layer_norm(x, b[None], w[None], None, 1e-6, one=0.0, backend=backend)
        return f

    ours = _grads(fn("triton"), x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE))
    ref = _grads(lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-6), x.double(), weight.double(), bias.double())
    for o, r in zip(ours, ref):
        _close(o, r, 1e-5)


def test_bf16_output_and_modulation(gen):
    ids, x, mods = _batch(gen, [6, 10], 64)
    shift, scale, _ = mods.float().chunk(3, dim=1)
    y = modulated_layer_norm(x.float().to(DEVICE), shift.bfloat16().to(DEVICE), scale.bfloat16().to(DEVICE),
                             ids.to(DEVICE), out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16
    _close(y, modulated_layer_norm_reference(x, shift.bfloat16().double(), scale.bfloat16().double(), ids), 1e-2)


def test_bad_inputs_are_named():
    x, ids = torch.randn(4, 8, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE)
    rows = lambda n, c: torch.zeros(n, c, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="shift"):
        modulated_layer_norm(x, rows(1, 7), rows(1, 8), ids, backend="triton")
    with pytest.raises(ValueError, match="single"):
        modulated_layer_norm(x, rows(2, 8), rows(2, 8), None)
    with pytest.raises(ValueError, match="same"):
        gated_residual(x, torch.randn(3, 8, device=DEVICE), rows(1, 8), ids)
    with pytest.raises(ValueError, match="backend"):
        gated_residual(x, x, rows(1, 8), ids, backend="cuda")
