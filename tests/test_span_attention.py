"""Span attention (Triton kernels, the interpreter on CPU) against the float64 PyTorch reference: plan, forward
(online and bounded), backward (gated, accumulated)."""
from __future__ import annotations

import pytest
import torch

import d3ds2.kernels.span_backward as span_bwd
import d3ds2.kernels.span_forward as span_fwd
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.span_common import LN2, LOG2E
from d3ds2.kernels.span_plan import _tile_unions, _tile_unions_triton, plan_spans
from d3ds2.kernels.span_reference import span_attention_reference
from sparse_helpers import assert_rel_close


def _random_spans(gen, n_spans, n_keys):
    cuts = torch.randperm(n_keys - 1, generator=gen)[: n_spans - 1].sort().values + 1
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([n_keys])]).int()


@pytest.mark.parametrize("hq,hkv,d,topk,spans,permuted,bounded", [
    (8, 2, 16, 3, "random", False, True), (2, 1, 32, 1, "random", True, True), (4, 2, 16, 12, "random", False, True),
    (4, 2, 16, 2, "shared", False, True), (2, 1, 16, 2, "shared", True, True), (8, 2, 16, 3, "random", True, False),
    (4, 2, 16, 2, "shared", False, False)])
def test_span_attention_kernel_matches_reference(gen, monkeypatch, hq, hkv, d, topk, spans, permuted, bounded):
    """random: each query picks random spans (1-key span, padded slot, topk > #spans); shared: every query
    picks the same two long spans, so whole chunks run the kernels' unmasked path. permuted: plan rows
    are q rows in a shuffled order (q_index). bounded: the forward without a running max (else online softmax)."""
    monkeypatch.setattr(span_bwd, "ROWS_PER_ITEM", 10)  # several dK/dV work items per chunk (atomics)
    # bounded: the bounded forward on short spans too; else never
    monkeypatch.setattr(span_fwd, "BOUNDED_MIN_KEYS", 0 if bounded else 2 ** 31)
    nq, nk, n_spans = 37, 61, 9
    if spans == "random":
        soff = _random_spans(gen, n_spans, nk)
        soff[3] = soff[2] + 1 if soff[3] > soff[2] + 1 else soff[3]  # a 1-key span (still increasing)
        idx = torch.stack([torch.randperm(n_spans, generator=gen)[: min(topk, n_spans)] for _ in range(nq * hkv)])
        idx = torch.cat([idx, idx.new_full((nq * hkv, max(0, topk - n_spans)), -1)], 1).view(nq, hkv, topk).int()
        idx[5, 0, 0] = -1  # a padded slot
    else:
        soff = torch.tensor([0, 40, nk], dtype=torch.int32)
        idx = torch.tensor([0, 1], dtype=torch.int32).expand(nq, hkv, 2).contiguous()
    q = torch.randn(nq, hq, d, generator=gen)
    k, v = (torch.randn(nk, hkv, d, generator=gen) for _ in range(2))
    q_index = torch.randperm(nq, generator=gen) if permuted else None
    bm = max(1, 16 // (hq // hkv))
    plan = plan_spans(idx, soff, block_m=bm)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = span_attention(*leaves, plan, backend="triton", block_k=16, block_q=2, block_kv=16, q_index=q_index)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rows = torch.arange(nq) if q_index is None else q_index  # plan row i is q row rows[i]
    o_ref, lse_ref = span_attention_reference(ref_leaves[0][rows], *ref_leaves[1:], idx, soff)
    o, lse = o[rows], lse[rows]
    assert_rel_close(o, o_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # a query with no key: lse = -inf
    assert_rel_close(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0))
    g = torch.randn(o.shape, generator=gen)
    o.backward(g)
    o_ref.backward(g.double())
    for a, b in zip(leaves, ref_leaves):
        assert_rel_close(a.grad, b.grad)


@pytest.mark.parametrize("hkv", [2, 3])
def test_span_key_bounds_hold_every_key_of_each_span(gen, hkv):
    """Per span: a center (the mean of its first 128 keys), the largest |k| and the largest |k - center|."""
    nk, d = 700, 16  # spans longer than one program's 128 keys, a span of one key, an empty span
    soff = torch.tensor([0, 300, 301, 301, 650, nk], dtype=torch.int32)
    k = torch.randn(nk, hkv, d, generator=gen) * torch.rand(nk, hkv, 1, generator=gen) * 3 + 2
    got = span_fwd.span_key_bounds(k, soff)
    for s, (a, b) in enumerate(zip(soff[:-1].tolist(), soff[1:].tolist())):
        if a == b:
            assert not bool(got[s].any())
            continue
        center = k[a:min(b, a + 128)].mean(0)
        assert torch.allclose(got[s, :, :d], center, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got[s, :, d], k[a:b].norm(dim=-1).amax(0), rtol=1e-6, atol=0)
        assert torch.allclose(got[s, :, d + 1], (k[a:b] - got[s, :, :d]).norm(dim=-1).amax(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("keys,loose", [("outlier 25", False), ("outlier 2000", True), ("offset 200", False)])
def test_bounded_forward_redoes_tiles_whose_bound_is_too_loose(gen, keys, loose):
    """Span 0's keys get a large component along a direction u every query turns away from (q.u <= -0.5):
    *outlier*: one key of that norm, so the bound of the rows that select span 0 lies above their scores by
    about 0.36 |q| norm log2 units: ~40, within the 64 the bounded pass keeps, or ~3000 (every p flushes to
    zero); *offset*: all of its keys shifted by 200 u, which the bound about 0 (|q| max|k|) would miss by ~300
    but the bound about the span's center does not. The loose tiles must be flagged, and the result must
    match the float64 reference either way."""
    nq, nk, hq, hkv, d = 40, 90, 4, 2, 16
    soff = torch.tensor([0, 30, 60, nk], dtype=torch.int32)
    idx = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(nq)]).view(nq, 1, 2).int()
    q = torch.randn(nq, hq, d, generator=gen)
    k, v = (torch.randn(nk, hkv, d, generator=gen) for _ in range(2))
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    q -= (q @ u).clamp_min(0)[..., None] * u + 0.5 * u
    kind, size = keys.split()
    if kind == "outlier":
        k[7] = float(size) * u
    else:
        k[:30] += float(size) * u
    plan = plan_spans(idx, soff, block_m=4)
    scale = d ** -0.5
    o_ref, lse_ref = span_attention_reference(q.double(), k.double(), v.double(), idx, soff, scale)

    o, lse2 = span_fwd.span_forward(q, k, v, plan, scale, 16, bounded=True)
    assert_rel_close(o, o_ref)
    assert_rel_close(lse2 * LN2, lse_ref)

    o1, lse1 = torch.empty_like(q), torch.empty(nq, hq)  # the bounded pass alone, without its redo
    redo = torch.empty(plan.union.shape[1], hkv, dtype=torch.int32)
    span_fwd._forward_launch(q, k, v, o1, lse1, plan, scale, 16, None, 1, span_fwd.span_key_bounds(k, soff), redo)
    tiles_with_span0 = (plan.union[0] == 0).any(-1)
    flagged = tiles_with_span0[:, None].expand(-1, hkv) if loose else torch.zeros_like(redo.bool())
    assert torch.equal(redo.bool(), flagged)
    if loose:  # the redo is what makes it right: alone, the rows that selected span 0 lost every score
        lost = (idx[:, 0] == 0).any(-1)
        assert bool(torch.isinf(lse1[lost]).all()) and bool(torch.isfinite(lse1[~lost]).all())
    else:
        assert_rel_close(o1, o_ref)


def test_fp16_forward_keeps_the_online_softmax(gen):
    """In fp16, P @ V would flush the bounded pass's p = exp2(c s - b) once the bound sits ~20 log2 units above
    the scores (span 0's keys shifted by 40 u: ~55 for the bound about 0): the forward keeps its running max."""
    nq, nk, hq, hkv, d = 24, 60, 2, 1, 16
    soff = torch.tensor([0, 30, nk], dtype=torch.int32)
    idx = torch.zeros(nq, 1, 1, dtype=torch.int32)
    q = torch.randn(nq, hq, d, generator=gen)
    k, v = (torch.randn(nk, hkv, d, generator=gen) for _ in range(2))
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    q -= (q @ u).clamp_min(0)[..., None] * u + 0.5 * u
    k[7] = 40 * u
    q, k, v = (t.half() for t in (q, k, v))
    plan = plan_spans(idx, soff, block_m=8)
    o_ref, _ = span_attention_reference(q.double(), k.double(), v.double(), idx, soff, d ** -0.5)
    o, _ = span_fwd.span_forward(q, k, v, plan, d ** -0.5, 16, bounded=True)
    assert_rel_close(o, o_ref, tol=2e-3)


def test_tile_unions_flag_spans_selected_by_every_query(gen):
    """plan_spans: per tile, the sorted unique spans and a flag where every query of the tile chose the span."""
    n, hi, topk, bm, n_spans = 23, 2, 3, 4, 5
    idx = torch.stack([torch.randperm(n_spans, generator=gen)[:topk] for _ in range(n * hi)]).view(n, hi, topk).int()
    idx[::3, :, 0] = -1
    idx[4:8] = torch.tensor([1, 3, -1], dtype=torch.int32)  # tile 1: spans 1 and 3 chosen by all its queries
    plan = plan_spans(idx, torch.arange(n_spans + 1, dtype=torch.int32), bm)
    for h in range(hi):
        for t in range((n + bm - 1) // bm):
            sel = idx[t * bm:(t + 1) * bm, h]
            spans = sorted(set(sel[sel >= 0].tolist()))
            c = int(plan.union_count[h, t])
            assert plan.union[h, t, :c].tolist() == spans and bool((plan.union[h, t, c:] == -1).all())
            full = [int(all(sp in row.tolist() for row in sel)) for sp in spans]
            assert plan.union_full[h, t, :c].tolist() == full and not bool(plan.union_full[h, t, c:].any())
    assert plan.union_full[:, 1, :2].tolist() == [[1, 1], [1, 1]]
    with pytest.raises(ValueError, match="twice"):
        plan_spans(torch.tensor([[[2, 2]]], dtype=torch.int32), torch.arange(4, dtype=torch.int32), 1)
    unchecked = plan_spans(idx, torch.arange(n_spans + 1, dtype=torch.int32), bm, check_unique=False)
    assert all(torch.equal(getattr(unchecked, f), getattr(plan, f)) for f in ("union", "union_count", "union_full"))


def _random_selection(gen, n, hi, topk, n_spans, pad=0.2):
    """idx [n, hi, topk] int32: distinct random spans per (query, head), a fraction ``pad`` of -1 slots."""
    idx = torch.stack([torch.randperm(n_spans, generator=gen)[:topk] for _ in range(n * hi)]).view(n, hi, topk)
    return torch.where(torch.rand(idx.shape, generator=gen) < pad, -1, idx).int()


@pytest.mark.parametrize("hi", [1, 2])
@pytest.mark.parametrize("topk", [1, 3, 8, 32])
@pytest.mark.parametrize("bm", [1, 4, 8])
def test_tile_unions_triton_matches_torch(gen, hi, topk, bm):
    """The Triton tile unions equal the PyTorch ones exactly (ids, counts, full flags, padding), with N not
    a multiple of block_m, -1 pads, tiles whose queries all select the same spans and a tile of pads only."""
    n = 5 * bm + bm // 2 + 1
    idx = _random_selection(gen, n, hi, topk, n_spans=topk + 5)
    shared = torch.randperm(topk + 5, generator=gen)[:topk].int()
    idx[bm:3 * bm] = shared.view(1, 1, topk)  # tiles 1 and 2: every query selects the same spans
    idx[3 * bm:4 * bm, :, 0] = shared[0]  # tile 3: one span shared, the rest mixed (distinct per query)
    idx[3 * bm:4 * bm, :, 1:] = torch.where(idx[3 * bm:4 * bm, :, 1:] == shared[0], -1, idx[3 * bm:4 * bm, :, 1:])
    idx[4 * bm:5 * bm] = -1  # tile 4: no span at all
    want = _tile_unions(idx, bm)
    for got in (_tile_unions_triton(idx, bm), plan_spans(idx, torch.arange(topk + 6, dtype=torch.int32), bm)):
        got = got if isinstance(got, tuple) else (got.union, got.union_count, got.union_full)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert bool(want[2][:, 1:3, :topk].all()) and not bool(want[0][:, 4].ne(-1).any())


def test_tile_unions_triton_tl_sort_path(gen):
    """The GPU variant of the union kernel (tl.sort instead of the min/max network) gives the same plan."""
    idx = _random_selection(gen, 11, 2, 3, n_spans=6)
    idx[4:8] = torch.tensor([2, 5, -1], dtype=torch.int32)
    for a, b in zip(_tile_unions_triton(idx, 4, minmax_sort=False), _tile_unions(idx, 4)):
        assert torch.equal(a, b)


def test_build_pairs_lists_selecting_queries_in_order(gen):
    """plan.pairs(): CSR of the queries that selected each (head, span), ascending, against a loop."""
    n, hi, topk, n_spans = 30, 2, 4, 9
    idx = _random_selection(gen, n, hi, topk, n_spans, pad=0.3)
    poff, pq = plan_spans(idx, torch.arange(n_spans + 1, dtype=torch.int32), 4, check_unique=False).pairs()
    assert poff.dtype == pq.dtype == torch.int32 and poff.numel() == hi * n_spans + 1 and int(poff[0]) == 0
    for h in range(hi):
        for sp in range(n_spans):
            want = [i for i in range(n) if sp in idx[i, h].tolist()]
            assert pq[poff[h * n_spans + sp]:poff[h * n_spans + sp + 1]].tolist() == want


def test_span_backward_gated_and_accumulated(gen):
    """span_backward for gate * attention: dq added to an existing dq, dk/dv to fp32 accumulators,
    delta.sum(1) = the gate's gradient; against autograd through the float64 reference."""
    nq, nk, hq, hkv, d = 29, 50, 4, 2, 16
    soff = _random_spans(gen, 6, nk)
    idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(nq * hkv)]).view(nq, hkv, 2).int()
    q = torch.randn(nq, hq, d, generator=gen)
    k, v = (torch.randn(nk, hkv, d, generator=gen) for _ in range(2))
    gate = torch.rand(nq, generator=gen)
    q_index = torch.randperm(nq, generator=gen)
    plan = plan_spans(idx, soff, block_m=4)
    o, lse2 = span_fwd.span_forward(q, k, v, plan, d ** -0.5, 16, q_index.int())
    dq0, dk0, dv0 = (torch.randn(t.shape, generator=gen) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen)
    dq, dk, dv, delta = span_bwd.span_backward(dout, q, k, v, o, lse2, plan, d ** -0.5, 16, 4, 16, q_index=q_index.int(),
                                      gate=gate, dq=dq0.clone(), dk=dk0.clone(), dv=dv0.clone())
    leaves = [t.double().requires_grad_() for t in (q, k, v, gate)]
    o_ref, lse_ref = span_attention_reference(leaves[0][q_index], leaves[1], leaves[2], idx, soff)
    inverse = torch.argsort(q_index)
    assert_rel_close(o, o_ref[inverse])
    assert_rel_close(lse2 / LOG2E, lse_ref[inverse])
    (leaves[3][:, None, None] * o_ref[inverse]).backward(dout.double())
    assert_rel_close(dq, dq0 + leaves[0].grad)
    assert_rel_close(dk, dk0 + leaves[1].grad)
    assert_rel_close(dv, dv0 + leaves[2].grad)
    assert_rel_close(delta.sum(1), leaves[3].grad)

