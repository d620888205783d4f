"""Full, cross and windowed sparse attention against a per-segment dense softmax reference in float64."""
from __future__ import annotations

import pytest
import torch

from d3ds2.attention import sparse_cross_attention, sparse_self_attention, varlen_attention, window_attention
from sparse_helpers import random_sparse


def _dense_reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v for one segment, GQA by repeating kv heads. [Lq, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_varlen_matches_per_segment_reference(gen):
    lens_q, lens_k = [5, 1, 9], [3, 7, 2]
    cu_q = torch.tensor([0, 5, 6, 15])
    cu_k = torch.tensor([0, 3, 10, 12])
    q = torch.randn(15, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k))
    ref = torch.cat([_dense_reference(q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]) for i in range(3)])
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), [q, k, v]), torch.autograd.grad((ref * g).sum(), [q, k, v])):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q[:, :3], k, v, cu_q, cu_k, 9, 7)


def test_varlen_span_kernel_matches_torch(gen):
    """kernel='span' (the Triton span kernel, interpreted on the CPU) against the padded-SDPA path: self- and
    cross-attention segments of different lengths, 16 q heads on 2 KV heads, outputs and gradients (fp32)."""
    cu_q = torch.tensor([0, 37, 38, 101])
    cu_k = torch.tensor([0, 20, 85, 90])
    q = torch.randn(101, 16, 16, generator=gen, requires_grad=True)
    k = torch.randn(90, 2, 16, generator=gen, requires_grad=True)
    v = torch.randn(90, 2, 16, generator=gen, requires_grad=True)
    g = torch.randn(101, 16, 16, generator=gen)
    outs, grads = {}, {}
    for kernel in ("span", "torch"):
        outs[kernel] = varlen_attention(q, k, v, cu_q, cu_k, 63, 65, kernel=kernel)
        grads[kernel] = torch.autograd.grad((outs[kernel] * g).sum(), [q, k, v])
    torch.testing.assert_close(outs["span"], outs["torch"], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads["span"], grads["torch"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kernel must be one of"):
        varlen_attention(q, k, v, cu_q, cu_k, 63, 65, kernel="fa3")


def test_self_attention_stays_within_sample(gen):
    x = random_sparse([20, 0, 13], 6, 1, gen)
    q, k, v = (torch.randn(x.num_voxels, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = sparse_self_attention(q, k, v, x)
    for s in x.layout:
        if s.stop > s.start:
            torch.testing.assert_close(out[s], _dense_reference(q[s], k[s], v[s]))


def test_cross_attention_to_dense_context(gen):
    x = random_sparse([11, 4], 6, 1, gen)
    q = torch.randn(x.num_voxels, 4, 8, generator=gen, dtype=torch.float64)
    ctx_k = torch.randn(2 * 6, 1, 8, generator=gen, dtype=torch.float64)
    ctx_v = torch.randn(2 * 6, 1, 8, generator=gen, dtype=torch.float64)
    out = sparse_cross_attention(q, x, ctx_k, ctx_v, torch.tensor([0, 6, 12]))
    for b, s in enumerate(x.layout):
        torch.testing.assert_close(out[s], _dense_reference(q[s], ctx_k[6 * b : 6 * b + 6], ctx_v[6 * b : 6 * b + 6]))


@pytest.mark.parametrize("window,shift", [(4, 0), (4, 2)])
def test_window_attention_matches_bruteforce_mask(gen, window, shift):
    x = random_sparse([70, 50], 9, 1, gen)
    q, k, v = (torch.randn(x.num_voxels, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = window_attention(q, k, v, x, window, shift)
    wid = torch.cat([x.coords[:, :1], (x.coords[:, 1:] + shift) // window], 1)
    same = (wid[:, None, :] == wid[None, :, :]).all(-1)  # [N, N] same window and sample
    s = torch.einsum("qhd,khd->hqk", q, k) / 2.0
    ref = torch.einsum("hqk,khd->qhd", s.masked_fill(~same, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(out, ref)
