"""SSA kernels on the GPU at large N in bf16/fp16 against float64 / float32 references.

Tolerances (relative L2 error): outputs vs a float64 reference on a subset of queries 2e-2 (bf16
operands); gradients vs the float32 PyTorch reference 3e-2.
"""
from __future__ import annotations

import pytest
import torch

from d3ds2.attention.ssa import SSAConfig, block_mean, build_ssa_layout, spatial_sparse_attention
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.span_plan import plan_spans
from d3ds2.kernels.span_reference import span_attention_reference
from d3ds2.kernels.ssa_topk import block_scores_reference
from sparse_helpers import shell

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _batch(sizes, seed):
    cs = [shell(r, 0.42 * r, 0.6, b) for b, r in enumerate(sizes)]
    c = torch.cat(cs)
    g = torch.Generator().manual_seed(seed)
    return c[torch.randperm(len(c), generator=g)].cuda()


def _inputs(lay, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = lay.num_tokens
    q = torch.randn(n, hq, d, device="cuda", generator=g).to(dtype)
    k, v = (torch.randn(n, hkv, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    kc = block_mean(k.reshape(n, -1).float() * 3, lay).view(-1, hkv, d).to(dtype)  # sharper compressed scores
    vc = block_mean(v.reshape(n, -1), lay).view(-1, hkv, d)
    gates = torch.rand(n, 3, device="cuda", generator=g).to(dtype)
    return q, k, v, kc, vc, gates


@pytest.mark.parametrize("cfg,hq,hkv,d,dtype", [
    (SSAConfig(m_cmp=8, m_slc=8, topk=8), 32, 2, 32, torch.bfloat16),
    (SSAConfig(m_cmp=4, m_slc=8, topk=8, window_shift=4), 32, 2, 32, torch.bfloat16),
    (SSAConfig(m_cmp=8, m_slc=8, topk=8, shared_topk=True), 16, 1, 64, torch.float16),
])
def test_large_n_against_float64_subset(cfg, hq, hkv, d, dtype):
    coords = _batch([96, 140], seed=1)  # about 60k tokens, two samples of different sizes
    lay = build_ssa_layout(coords, cfg.m_cmp, cfg.m_slc)
    q, k, v, kc, vc, gates = _inputs(lay, hq, hkv, d, dtype, 2)
    out, (o_cmp, o_slc, o_win, idx) = spatial_sparse_attention(q, k, v, kc, vc, gates, lay, cfg, return_branches=True)
    sub = torch.randperm(lay.num_tokens, device="cuda")[:256]
    qd = q[sub].double()
    cmp_idx = lay.sample_of_token[sub].view(-1, 1, 1)
    o_ref, lse_ref = span_attention_reference(qd, kc.double(), vc.double(), cmp_idx, lay.sample_cmp_offsets)
    assert _rel(o_cmp[sub], o_ref) < 2e-2
    # top-k: the kernel's blocks carry (almost) the reference's best scores
    scores = block_scores_reference(qd, kc.double(), lse_ref, lay.sample_of_token[sub], lay.sample_block_offsets,
                                    lay.block_of_cmp)
    best = scores.topk(cfg.topk, -1).values.clamp_min(0).sum(-1)
    if not cfg.shared_topk:
        got = torch.where(idx[sub] >= 0, torch.gather(scores, 2, idx[sub].long().clamp(min=0)), 0.0).sum(-1)
        assert bool((got >= best * (1 - 2e-2) - 1e-6).all())
    # selection with the kernel's own blocks, and window attention
    s_ref, _ = span_attention_reference(qd, k.double(), v.double(), idx[sub], lay.block_offsets)
    assert _rel(o_slc[sub], s_ref) < 2e-2
    w = torch.cat([lay.coords[:, :1], (lay.coords[:, 1:] + cfg.window_shift) // cfg.m_win], 1)
    _, win = torch.unique(w, dim=0, return_inverse=True)
    order = torch.argsort(win, stable=True)
    woff = torch.zeros(int(win.max()) + 2, dtype=torch.int32, device="cuda")
    woff[1:] = torch.bincount(win).cumsum(0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order), device="cuda")
    w_ref, _ = span_attention_reference(qd, k[order].double(), v[order].double(), win[sub].view(-1, 1, 1).int(), woff)
    assert _rel(o_win[sub], w_ref) < 2e-2
    g = gates[sub].double()[:, :, None, None]
    ref = g[:, 0] * o_ref + g[:, 1] * s_ref + g[:, 2] * w_ref
    assert _rel(out[sub], ref) < 2e-2


@pytest.mark.parametrize("cfg", [SSAConfig(m_cmp=8, m_slc=8, topk=4), SSAConfig(m_cmp=4, m_slc=8, topk=6, window_shift=4)])
def test_gradients_bf16_against_float32_reference(cfg):
    coords = _batch([40, 56], seed=3)  # ~8k tokens
    lay = build_ssa_layout(coords, cfg.m_cmp, cfg.m_slc)
    ins = _inputs(lay, 32, 2, 32, torch.bfloat16, 4)
    leaves = [t.clone().requires_grad_() for t in ins]
    out, (*_, idx) = spatial_sparse_attention(*leaves, lay, cfg, return_branches=True)
    ref_leaves = [t.float().requires_grad_() for t in ins]
    ref_cfg = SSAConfig(**{**cfg.__dict__, "backend": "torch"})
    ref, (*_, idx_ref) = spatial_sparse_attention(*ref_leaves, lay, ref_cfg, return_branches=True)
    agree = (idx.sort(-1).values == idx_ref.sort(-1).values).all(-1).float().mean().item()
    assert agree > 0.97  # bf16 vs fp32 scores: near-ties may flip a few selections
    keep = (idx.sort(-1).values == idx_ref.sort(-1).values).all(-1).all(-1)
    assert _rel(out[keep], ref[keep]) < 2e-2
    gout = torch.randn_like(ref)
    gout[~keep] = 0  # compare gradients only through queries with identical selections
    out.backward(gout.to(out.dtype))
    ref.backward(gout)
    for a, b in zip(leaves, ref_leaves):
        assert _rel(a.grad, b.grad) < 3e-2


@pytest.mark.parametrize("compression", ["v1", "v2"])
def test_module_bf16_autocast_against_float32_reference(compression):
    """The module under bf16 autocast (as in training) against the float32 PyTorch reference backend."""
    from d3ds2.attention.ssa import SpatialSparseAttention
    from d3ds2.sparse import SparseTensor

    coords = _batch([40, 56], seed=5)
    torch.manual_seed(6)
    feats = torch.randn(len(coords), 256, device="cuda")
    x = SparseTensor.from_unsorted(feats, coords)
    cfg = SSAConfig(m_cmp=4, m_slc=8, topk=4, window_shift=4, compression=compression)
    mod = SpatialSparseAttention(256, 8, 2, config=cfg).cuda()
    ref = SpatialSparseAttention(256, 8, 2, config=SSAConfig(**{**cfg.__dict__, "backend": "torch"})).cuda()
    ref.load_state_dict(mod.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mod(x).feats
    y_ref = ref(x).feats
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel(y, y_ref) < 5e-2  # bf16 everywhere, and near-tie selections may differ for a few queries


def test_varlen_span_kernel_gradients_bf16():
    """Full attention over ragged samples through the span kernel (spans = samples, the DiT's
    attention_kernel='span'), bf16 against the float32 PyTorch reference."""
    g = torch.Generator(device="cuda").manual_seed(3)
    cu = torch.tensor([0, 1500, 2201, 4300], device="cuda", dtype=torch.int32)
    n = int(cu[-1])
    q = torch.randn(n, 32, 32, device="cuda", generator=g)
    k, v = (torch.randn(n, 2, 32, device="cuda", generator=g) for _ in range(2))
    do = torch.randn(n, 32, 32, device="cuda", generator=g)
    seg = torch.repeat_interleave(torch.arange(3, device="cuda"), cu.diff()).int().view(-1, 1, 1)
    plan = plan_spans(seg, cu, 4, query_offsets=cu, check_unique=False)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = span_attention(*leaves, plan)[0]
    out.backward(do.to(torch.bfloat16))
    ref_leaves = [t.requires_grad_() for t in (q, k, v)]
    ref = span_attention_reference(*ref_leaves, seg, cu)[0]
    ref.backward(do)
    assert _rel(out, ref) < 2e-2
    for a, b in zip(leaves, ref_leaves):
        assert _rel(a.grad, b.grad) < 3e-2


@pytest.mark.parametrize("window_shift", [0, 4])
def test_backward_does_not_sync_with_the_host(window_shift):
    """The SSA backward (all three branches) and the varlen span backward queue their kernels without a
    host sync (each one stalls the GPU for the host's next launches; torch raises on one in 'error' mode).
    The layout and the forward may sync (once per forward)."""
    from d3ds2.attention.varlen import varlen_attention

    cfg = SSAConfig(m_cmp=8, m_slc=8, topk=4, window_shift=window_shift)
    lay = build_ssa_layout(_batch([40, 56], seed=7), cfg.m_cmp, cfg.m_slc)
    leaves = [t.clone().requires_grad_() for t in _inputs(lay, 32, 2, 32, torch.bfloat16, 8)]
    out = spatial_sparse_attention(*leaves, lay, cfg)
    q, k, v = (t.detach().clone().requires_grad_() for t in leaves[:3])
    cu = lay.sample_token_offsets
    full = varlen_attention(q, k, v, cu, cu, lay.num_tokens, lay.num_tokens, kernel="span")
    grad, grad_full = torch.randn_like(out), torch.randn_like(full)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out.backward(grad)
        full.backward(grad_full)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(t.grad is not None for t in leaves[:3] + [q, k, v])


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] != 9, reason="the guard is for sm_90 (Hopper)")
def test_dkdv_tiles_below_64_keys_are_refused_on_hopper():
    q = torch.randn(64, 4, 32, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(64, 1, 32, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 64], device="cuda", dtype=torch.int32)
    plan = plan_spans(torch.zeros(64, 1, 1, device="cuda", dtype=torch.int32), cu, 16, query_offsets=cu,
                      check_unique=False)
    with pytest.raises(ValueError, match="block_kv=32 .*Use block_kv >= 64"):
        span_attention(q, k, k, plan, block_kv=32)
    o, _ = span_attention(q, k, k, plan, block_kv=64)
    ref, _ = span_attention_reference(q.float(), k.float(), k.float(), plan.idx, plan.span_offsets)
    assert _rel(o, ref) < 2e-2


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] != 9, reason="the Gluon dK/dV kernel is for sm_90")
@pytest.mark.parametrize("cfg,hq,hkv,d,dtype", [
    (SSAConfig(m_cmp=8, m_slc=8, topk=8), 32, 2, 32, torch.bfloat16),  # selection: Hi = Hkv, many queries/block
    (SSAConfig(m_cmp=4, m_slc=8, topk=4, window_shift=4), 32, 2, 32, torch.bfloat16),  # shifted windows: q_index
    (SSAConfig(m_cmp=8, m_slc=8, topk=8, shared_topk=True), 16, 1, 64, torch.float16),  # head dim 64, fp16
])
def test_hopper_dkdv_kernel_matches_the_triton_kernel(cfg, hq, hkv, d, dtype, monkeypatch):
    """SSA's backward (three gated branches sharing dQ) with the Gluon dK/dV kernel against the same backward
    with the Triton dK/dV kernel: same selections, so the gradients agree up to the fp32 atomics' order."""
    import d3ds2.kernels.span_backward as span_bwd

    lay = build_ssa_layout(_batch([48, 64], seed=9), cfg.m_cmp, cfg.m_slc)
    ins = _inputs(lay, hq, hkv, d, dtype, 10)
    gout = torch.randn(lay.num_tokens, hq, d, device="cuda", dtype=dtype)
    grads = {}
    for hopper in (True, False):
        if not hopper:  # the Triton kernel, as on GPUs the Gluon one does not serve
            monkeypatch.setattr(span_bwd, "hopper_dkdv_usable", lambda *args: False)
        leaves = [t.clone().requires_grad_() for t in ins]
        spatial_sparse_attention(*leaves, lay, cfg).backward(gout)
        grads[hopper] = [t.grad for t in leaves]
    for name, a, b in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), grads[True], grads[False]):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 2e-3, name
