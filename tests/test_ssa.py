"""SSA: layout, kernels (Triton, interpreter on CPU) against the PyTorch reference, module against a
brute-force dense definition written from coords alone (float64)."""
from __future__ import annotations

import pytest
import torch

from d3ds2.attention.ssa import (SSAConfig, SpatialSparseAttention, block_mean, build_ssa_layout,
                                 compressed_attention, spatial_sparse_attention)
from d3ds2.sparse import SparseTensor
from d3ds2.kernels.span_attention import plan_spans, span_attention, span_attention_reference
from d3ds2.kernels.ssa_topk import block_scores_reference, score_chunks, score_topk, shared_score_topk, topk_reference
from sparse_helpers import shell


def _coords(gen, shuffle=True):
    """Two shells of different sizes, a sample made of one voxel (a single 1-token block), shuffled."""
    c = torch.cat([shell(10, 3.5, 0.7, 0), shell(6, 2.0, 0.6, 1), torch.tensor([[2, 5, 6, 7]], dtype=torch.int32)])
    return c[torch.randperm(len(c), generator=gen)] if shuffle else c


def _close(a, b, tol=2e-5):
    a, b = a.double(), b.double()
    err = (a - b).norm() / b.norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("m_cmp,m_slc", [(4, 4), (2, 4)])
def test_layout_groups_blocks_and_sub_blocks(gen, m_cmp, m_slc):
    c = _coords(gen)
    lay = build_ssa_layout(c, m_cmp, m_slc)
    s = lay.coords.long()
    assert torch.equal(c[lay.perm], lay.coords) and torch.equal(lay.coords[lay.inverse], c)
    # samples contiguous, in order
    assert bool((s[1:, 0] >= s[:-1, 0]).all())
    # every selection block / compression block is one contiguous run with constant block coords
    for offs, size in ((lay.block_offsets, m_slc), (lay.cmp_offsets, m_cmp)):
        cell = torch.cat([s[:, :1], s[:, 1:] // size], 1)
        start = offs[:-1].long()
        seg = torch.repeat_interleave(torch.arange(len(start)), (offs[1:] - offs[:-1]).long())
        assert torch.equal(cell, cell[start][seg])
        assert bool((cell[start][1:] != cell[start][:-1]).any(1).all())
    # slots: each compressed token sits in its selection block's slot table exactly once
    occupied = lay.slots[lay.slots >= 0]
    assert torch.equal(occupied.sort().values, torch.arange(lay.cmp_counts.numel(), dtype=torch.int32))
    blk_of_cmp = lay.block_of_token[lay.cmp_offsets[:-1].long()]
    rows = torch.nonzero(lay.slots >= 0)[:, 0]
    assert torch.equal(blk_of_cmp[lay.slots[lay.slots >= 0].long()].long(), rows)


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
    import d3ds2.kernels.span_attention as sa

    monkeypatch.setattr(sa, "ROWS_PER_ITEM", 10)  # several dK/dV work items per chunk (atomics)
    monkeypatch.setattr(sa, "BOUNDED_FORWARD", bounded)
    monkeypatch.setattr(sa, "BOUNDED_MIN_KEYS", 0)  # the bounded forward on short spans too
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
    _close(o, o_ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # a query with no key: lse = -inf
    _close(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0))
    g = torch.randn(o.shape, generator=gen)
    o.backward(g)
    o_ref.backward(g.double())
    for a, b in zip(leaves, ref_leaves):
        _close(a.grad, b.grad)


@pytest.mark.parametrize("hkv", [2, 3])
def test_span_key_bounds_hold_every_key_of_each_span(gen, hkv):
    """Per span: a center (the mean of its first 128 keys), the largest |k| and the largest |k - center|."""
    from d3ds2.kernels.span_attention import span_key_bounds

    nk, d = 700, 16  # spans longer than one program's 128 keys, a span of one key, an empty span
    soff = torch.tensor([0, 300, 301, 301, 650, nk], dtype=torch.int32)
    k = torch.randn(nk, hkv, d, generator=gen) * torch.rand(nk, hkv, 1, generator=gen) * 3 + 2
    got = span_key_bounds(k, soff)
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
    import d3ds2.kernels.span_attention as sa

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

    o, lse2 = sa.span_forward(q, k, v, plan, scale, 16, bounded=True)
    _close(o, o_ref)
    _close(lse2 * sa.LN2, lse_ref)

    o1, lse1 = torch.empty_like(q), torch.empty(nq, hq)  # the bounded pass alone, without its redo
    redo = torch.empty(plan.union.shape[1], hkv, dtype=torch.int32)
    sa._forward_launch(q, k, v, o1, lse1, plan, scale, 16, None, 1, sa.span_key_bounds(k, soff), redo)
    tiles_with_span0 = (plan.union[0] == 0).any(-1)
    flagged = tiles_with_span0[:, None].expand(-1, hkv) if loose else torch.zeros_like(redo.bool())
    assert torch.equal(redo.bool(), flagged)
    if loose:  # the redo is what makes it right: alone, the rows that selected span 0 lost every score
        lost = (idx[:, 0] == 0).any(-1)
        assert bool(torch.isinf(lse1[lost]).all()) and bool(torch.isfinite(lse1[~lost]).all())
    else:
        _close(o1, o_ref)


def test_fp16_forward_keeps_the_online_softmax(gen):
    """In fp16, P @ V would flush the bounded pass's p = exp2(c s - b) once the bound sits ~20 log2 units above
    the scores (span 0's keys shifted by 40 u: ~55 for the bound about 0): the forward keeps its running max."""
    import d3ds2.kernels.span_attention as sa

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
    o, _ = sa.span_forward(q, k, v, plan, d ** -0.5, 16, bounded=True)
    _close(o, o_ref, tol=2e-3)


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
    from d3ds2.kernels.span_attention import _tile_unions, _tile_unions_triton

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
    from d3ds2.kernels.span_attention import _tile_unions, _tile_unions_triton

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
    from d3ds2.kernels.span_attention import LOG2E, span_backward, span_forward

    nq, nk, hq, hkv, d = 29, 50, 4, 2, 16
    soff = _random_spans(gen, 6, nk)
    idx = torch.stack([torch.randperm(6, generator=gen)[:2] for _ in range(nq * hkv)]).view(nq, hkv, 2).int()
    q = torch.randn(nq, hq, d, generator=gen)
    k, v = (torch.randn(nk, hkv, d, generator=gen) for _ in range(2))
    gate = torch.rand(nq, generator=gen)
    q_index = torch.randperm(nq, generator=gen)
    plan = plan_spans(idx, soff, block_m=4)
    o, lse2 = span_forward(q, k, v, plan, d ** -0.5, 16, q_index.int())
    dq0, dk0, dv0 = (torch.randn(t.shape, generator=gen) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen)
    dq, dk, dv, delta = span_backward(dout, q, k, v, o, lse2, plan, d ** -0.5, 16, 4, 16, q_index=q_index.int(),
                                      gate=gate, dq=dq0.clone(), dk=dk0.clone(), dv=dv0.clone())
    leaves = [t.double().requires_grad_() for t in (q, k, v, gate)]
    o_ref, lse_ref = span_attention_reference(leaves[0][q_index], leaves[1], leaves[2], idx, soff)
    inverse = torch.argsort(q_index)
    _close(o, o_ref[inverse])
    _close(lse2 / LOG2E, lse_ref[inverse])
    (leaves[3][:, None, None] * o_ref[inverse]).backward(dout.double())
    _close(dq, dq0 + leaves[0].grad)
    _close(dk, dk0 + leaves[1].grad)
    _close(dv, dv0 + leaves[2].grad)
    _close(delta.sum(1), leaves[3].grad)


def _scoring_inputs(gen, m_cmp, m_slc, hq=8, hkv=2, d=16):
    lay = build_ssa_layout(_coords(gen), m_cmp, m_slc)
    n, nc = lay.num_tokens, lay.cmp_counts.numel()
    q = torch.randn(n, hq, d, generator=gen)
    kc = torch.randn(nc, hkv, d, generator=gen)
    vc = torch.randn(nc, hkv, d, generator=gen)
    _, lse = span_attention_reference(q, kc, vc, lay.sample_of_token.view(-1, 1, 1), lay.sample_cmp_offsets)
    return lay, q, kc, lse


@pytest.mark.parametrize("m_cmp,m_slc,topk,width", [(4, 4, 3, None), (2, 4, 5, None), (4, 4, 9, None),
                                                    (2, 4, 4, 16), (1, 4, 4, 64)])
def test_score_topk_kernel_selects_reference_topk(gen, m_cmp, m_slc, topk, width):
    lay, q, kc, lse = _scoring_inputs(gen, m_cmp, m_slc)
    args = (q, kc, lse, lay.sample_of_token, lay.sample_block_offsets, lay.block_of_cmp)
    chunks = lay.score_chunks()
    if width is not None:  # narrow chunks (many per sample) / blocks that fill a whole chunk (1 + 63 slots)
        chunks = score_chunks(lay.block_of_cmp, lay.sample_block_offsets, (m_slc // m_cmp) ** 3, width=width)
    idx, val = score_topk(*args, topk, chunks=chunks, backend="triton")
    scores = block_scores_reference(q.double(), kc.double(), lse.double(), lay.sample_of_token,
                                    lay.sample_block_offsets, lay.block_of_cmp)
    idx_ref, val_ref = topk_reference(scores, topk)
    # same values (robust to ties), and the kernel's values are the reference scores of its blocks
    _close(val.sort(-1).values, val_ref.sort(-1).values)
    assert torch.equal((idx >= 0).sum(-1), (idx_ref >= 0).sum(-1))
    picked = torch.gather(scores, 2, idx.long().clamp(min=0))
    assert not bool(((idx >= 0) & (picked < 0)).any())  # only blocks of the query's own sample
    _close(torch.where(idx >= 0, picked, -2.0), torch.where(idx >= 0, val.double(), -2.0))
    # top-k larger than a sample's block count: every block of that sample, then -1
    per_sample = (lay.sample_block_offsets[1:] - lay.sample_block_offsets[:-1]).long()
    assert torch.equal((idx >= 0).sum(-1)[:, 0], per_sample[lay.sample_of_token.long()].clamp(max=topk))


@pytest.mark.parametrize("m_cmp,m_slc,width", [(2, 4, 64), (2, 4, 16), (1, 4, 64), (2, 8, 64)])
def test_score_chunks_cover_whole_blocks_within_width(gen, m_cmp, m_slc, width):
    lay = build_ssa_layout(_coords(gen), m_cmp, m_slc)
    per_block = (m_slc // m_cmp) ** 3
    ch = score_chunks(lay.block_of_cmp, lay.sample_block_offsets, per_block, width=width)
    cmp, blk, soff = ch.chunk_cmp.long(), ch.chunk_block.long(), ch.sample_chunk_offsets.long()
    nc, m = lay.cmp_counts.numel(), int(lay.sample_block_offsets[-1])
    # chunks tile the compressed tokens and the blocks in order, each within `width` tokens
    assert cmp[0] == 0 and cmp[-1] == nc and blk[0] == 0 and blk[-1] == m
    assert bool((cmp[1:] > cmp[:-1]).all()) and bool((blk[1:] > blk[:-1]).all())
    assert int((cmp[1:] - cmp[:-1]).max()) <= width
    # a chunk holds exactly the tokens of its blocks (no block is split), and stays in one sample
    block_first = torch.searchsorted(lay.block_of_cmp.long(), torch.arange(m + 1))
    assert torch.equal(block_first[blk], cmp)
    sbo = lay.sample_block_offsets.long()
    assert torch.equal(blk[soff], sbo)


def test_shared_score_topk_kernel_matches_reference(gen):
    lay, q, kc, lse = _scoring_inputs(gen, 2, 4)
    args = (q, kc, lse, lay.cmp_offsets, lay.sample_of_cmp, lay.sample_block_offsets, lay.slots, lay.block_of_cmp, 3)
    idx, val = shared_score_topk(*args, backend="triton")
    idx_ref, val_ref = shared_score_topk(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                           for a in args], backend="torch")
    _close(val.sort(-1).values, val_ref.sort(-1).values)
    assert torch.equal((idx >= 0).sum(-1), (idx_ref >= 0).sum(-1))


CONFIGS = [
    SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=3),
    SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=5, window_shift=2),
    SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2, shared_topk=True),
]


def _selection_is_clear(q, kc, vc, lay, cfg, margin=2e-6) -> bool:
    """Whether every (query, KV head)'s float64 top-k is unambiguous: its k-th block score beats the
    next one by more than ``margin`` (fp32 kernels may swap blocks closer than that)."""
    q, kc = q.double(), kc.double()
    _, lse = compressed_attention(q, kc, vc.double(), lay, backend="torch")
    if cfg.shared_topk:
        _, val = shared_score_topk(q, kc, lse, lay.cmp_offsets, lay.sample_of_cmp, lay.sample_block_offsets,
                                   lay.slots, lay.block_of_cmp, cfg.topk + 1, backend="torch")
    else:
        _, val = score_topk(q, kc, lse, lay.sample_of_token, lay.sample_block_offsets, lay.block_of_cmp,
                            cfg.topk + 1, chunks=lay.score_chunks(), backend="torch")
    runner_up = val[..., -1] >= 0  # a (k+1)-th block exists
    return bool(((val[..., -2] - val[..., -1])[runner_up] > margin).all())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_functional_ssa_triton_matches_torch(gen, cfg):
    for _ in range(10):  # fresh inputs until no block scores are near-tied at the top-k boundary
        lay = build_ssa_layout(_coords(gen), cfg.m_cmp, cfg.m_slc)
        n, hq, hkv, d = lay.num_tokens, 4, 2, 16
        q = torch.randn(n, hq, d, generator=gen)
        k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
        kc = block_mean(k.view(n, -1), lay).view(-1, hkv, d)
        vc = block_mean(v.view(n, -1), lay).view(-1, hkv, d)
        if _selection_is_clear(q, kc, vc, lay, cfg):
            break
    else:
        pytest.fail("10 draws in a row had near-tied block scores; the margin or the sizes need a look")
    gates = torch.rand(n, 3, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, kc, vc, gates)]
    out, (*_, idx) = spatial_sparse_attention(*leaves, lay, cfg, return_branches=True)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, kc, vc, gates)]
    ref_cfg = SSAConfig(**{**cfg.__dict__, "backend": "torch"})
    ref, (*_, idx_ref) = spatial_sparse_attention(*ref_leaves, lay, ref_cfg, return_branches=True)
    assert torch.equal(idx.sort(-1).values, idx_ref.sort(-1).values)  # near-ties were drawn away above
    _close(out, ref)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    ref.backward(g.double())
    for a, b in zip(leaves, ref_leaves):
        _close(a.grad, b.grad)


def test_triton_ssa_memory_design(gen):
    """The Triton path saves q as its only [N, Hq, D] tensor (plus k/v, compressed k/v, gates and two LSEs);
    the forward allocates the three branch outputs and the output, the backward only dQ and the
    recomputed window output (no gated dO copies, no zero gradients for the inspection outputs). Head dim 32:
    the backward's folded-column buffers are [N, Hq, 16], which head dim 16 would count as activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountActivations(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.made = shape, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made = func.overloadpacket in (torch.ops.aten.empty_like, torch.ops.aten.empty, torch.ops.aten.zeros,
                                           torch.ops.aten.zeros_like, torch.ops.aten.empty_strided,
                                           torch.ops.aten.new_zeros, torch.ops.aten.new_empty, torch.ops.aten.mul,
                                           torch.ops.aten.add, torch.ops.aten.clone, torch.ops.aten.index)
            if made and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
                self.made.append(func.overloadpacket.__name__)
            return out

    cfg = SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=3, window_shift=2)
    lay = build_ssa_layout(_coords(gen), cfg.m_cmp, cfg.m_slc)
    n, hq, hkv, d = lay.num_tokens, 4, 2, 32
    q = torch.randn(n, hq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(n, hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    kc = block_mean(k.detach().view(n, -1), lay).view(-1, hkv, d)
    vc = block_mean(v.detach().view(n, -1), lay).view(-1, hkv, d)
    gates = torch.rand(n, 3, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with CountActivations(tuple(q.shape)) as fwd:
            out = spatial_sparse_attention(q, k, v, kc, vc, gates, lay, cfg)
    assert [tuple(t.shape) for t in saved].count(tuple(q.shape)) == 1
    assert sum(t.numel() for t in saved) == q.numel() + 2 * k.numel() + 2 * kc.numel() + gates.numel() + 2 * n * hq
    assert len(fwd.made) == 4, fwd.made
    with CountActivations(tuple(q.shape)) as bwd:
        out.backward(torch.randn(out.shape, generator=gen))
    assert len(bwd.made) == 2, bwd.made
    assert all(t.grad is not None for t in (q, k, v, gates))


def _dense_ssa(module, x):
    """Brute-force SSA from the coords (float64, O(N^2)): the definition of the module's output."""
    cfg = module.config
    hq, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    g = hq // hkv
    c = x.coords.long()
    f = x.feats
    n = f.shape[0]
    q = module.proj_q(f).view(n, hkv, g, d)
    k, v = module.proj_k(f), module.proj_v(f)
    pos = c[:, 1:] % cfg.m_cmp
    k_pe = k + module.intra_block_pe[pos[:, 0], pos[:, 1], pos[:, 2]]
    # compressed tokens: unique (batch, block) cells in any order
    cell, cmp_of = torch.unique(torch.cat([c[:, :1], c[:, 1:] // cfg.m_cmp], 1), dim=0, return_inverse=True)
    onehot = torch.nn.functional.one_hot(cmp_of, len(cell)).double()  # [N, Nc]
    mean = onehot / onehot.sum(0)
    k_cmp = (mean.T @ torch.nn.functional.silu(module.compression_key.proj(k_pe))).view(-1, hkv, d)
    v_cmp = (mean.T @ torch.nn.functional.silu(module.compression_value.proj(v))).view(-1, hkv, d)
    same_sample = c[:, None, 0] == cell[None, :, 0]  # [N, Nc]
    s = torch.einsum("nhgd,chd->nhgc", q, k_cmp) / d**0.5
    p = s.masked_fill(~same_sample[:, None, None], float("-inf")).softmax(-1)
    o_cmp = torch.einsum("nhgc,chd->nhgd", p, v_cmp)
    # selection blocks: compressed probabilities summed into m_slc cells and over the group's heads
    scell, slc_of_cmp = torch.unique(torch.cat([cell[:, :1], cell[:, 1:] // (cfg.m_slc // cfg.m_cmp)], 1),
                                     dim=0, return_inverse=True)
    score = torch.einsum("nhgc,cs->nhs", p, torch.nn.functional.one_hot(slc_of_cmp, len(scell)).double())
    own = c[:, None, 0] == scell[None, :, 0]
    score = score.masked_fill(~own[:, None], -1.0)
    top = score.topk(min(cfg.topk, len(scell)), -1)
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)
    slc_of_token = torch.unique(torch.cat([c[:, :1], c[:, 1:] // cfg.m_slc], 1), dim=0, return_inverse=True)[1]
    mask_slc = chosen[:, :, slc_of_token]  # [N, Hkv, N]
    w = torch.cat([c[:, :1], (c[:, 1:] + cfg.window_shift) // cfg.m_win], 1)
    mask_win = (w[:, None] == w[None, :]).all(-1)
    kk, vv = k.view(n, hkv, d), v.view(n, hkv, d)
    s = torch.einsum("nhgd,mhd->nhgm", q, kk) / d**0.5
    o_slc = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~mask_slc[:, :, None], float("-inf")).softmax(-1), vv)
    o_win = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~mask_win[:, None, None], float("-inf")).softmax(-1), vv)
    gate = module.gate(f)[:, :, None, None, None]
    o = gate[:, 0] * o_cmp + gate[:, 1] * o_slc + gate[:, 2] * o_win
    return module.proj_o(o.reshape(n, hq * d))


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_module_matches_bruteforce_definition(gen, cfg):
    coords = _coords(gen, shuffle=False)
    order = torch.randperm(len(coords), generator=gen)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen, dtype=torch.float64), coords[order])
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref_mod = SpatialSparseAttention(64, num_heads=4, num_kv_heads=2, config=SSAConfig(**{**cfg.__dict__,
                                                                                         "backend": "torch"}))
    ref_mod = ref_mod.double()
    with torch.no_grad():  # non-zero PE and compression so that they matter
        ref_mod.intra_block_pe.normal_()
    out = ref_mod(x)
    assert torch.equal(out.coords, x.coords)
    _close(out.feats, _dense_ssa(ref_mod, x), tol=1e-10)
    # triton backend: same parameters, float32; outputs and every parameter's gradient
    mod = SpatialSparseAttention(64, num_heads=4, num_kv_heads=2, config=cfg)
    mod.load_state_dict({k: v.float() for k, v in ref_mod.state_dict().items()})
    xf = x.replace(x.feats.float())
    y = mod(xf).feats
    _close(y, out.feats)
    gout = torch.randn(y.shape, generator=gen)
    y.backward(gout)
    out.feats.backward(gout.double())
    for (name, p), (_, pr) in zip(mod.named_parameters(), ref_mod.named_parameters()):
        assert p.grad is not None, name
        _close(p.grad, pr.grad, tol=5e-5)


def test_layout_is_cached_across_layers(gen):
    coords = _coords(gen, shuffle=False)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen), coords)
    a = SpatialSparseAttention(64, 4, 2, config=SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2))
    b = SpatialSparseAttention(64, 4, 2, config=SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2))
    y = b(a(x))
    assert len([key for key in y.cache if key[0] == "ssa_layout"]) == 1
    assert a.layout_for(x) is b.layout_for(y)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of m_cmp"):
        SSAConfig(m_cmp=3, m_slc=8)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        build_ssa_layout(torch.zeros(5, 3, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="head_dim"):
        lay = build_ssa_layout(torch.zeros(1, 4, dtype=torch.int32), 4, 4)
        span_attention(torch.zeros(1, 2, 12), torch.zeros(1, 1, 12), torch.zeros(1, 1, 12),
                       lay.compressed_plan(2))


def test_compression_v2_matches_dense_conv(gen):
    """v2 compression against dense Conv3d on the zero-filled coarse grid (submanifold = dense at sites)."""
    from d3ds2.attention.ssa import CompressionV2

    coords = _coords(gen)
    lay = build_ssa_layout(coords, 2, 4)
    c = 32
    x = torch.randn(lay.num_tokens, c, generator=gen, dtype=torch.float64)
    mod = CompressionV2(c, groups=8).double()
    with torch.no_grad():
        for norm in (mod.norm1, mod.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    out = mod(x, lay)
    # reference: per-sample group norm over the sample's tokens, block mean, dense convs
    s = lay.coords.long()
    b = s[:, 0]

    def group_norm(f, batch, norm):
        out = torch.empty_like(f)
        for i in batch.unique():
            m = batch == i
            out[m] = torch.nn.functional.group_norm(f[m].T[None], norm.num_groups, norm.weight, norm.bias, norm.eps)[0].T
        return out

    h = torch.nn.functional.silu(group_norm(x, b, mod.norm1))
    cell, inv = torch.unique(torch.cat([s[:, :1], s[:, 1:] // 2], 1), dim=0, return_inverse=True)
    cnt = torch.bincount(inv).double()[:, None]
    pooled = torch.zeros(len(cell), c, dtype=torch.float64).index_add_(0, inv, h) / cnt
    skip = torch.zeros(len(cell), c, dtype=torch.float64).index_add_(0, inv, x) / cnt
    r = int(cell[:, 1:].max()) + 1
    nb = int(cell[:, 0].max()) + 1

    def conv(f, layer):
        grid = torch.zeros(nb, c, r, r, r, dtype=torch.float64)
        grid[cell[:, 0], :, cell[:, 1], cell[:, 2], cell[:, 3]] = f
        y = torch.nn.functional.conv3d(grid, layer.weight, layer.bias, padding=1)
        return y[cell[:, 0], :, cell[:, 1], cell[:, 2], cell[:, 3]]

    h = conv(pooled, mod.conv1)
    h = conv(torch.nn.functional.silu(group_norm(h, cell[:, 0], mod.norm2)), mod.conv2)
    ref = skip + h
    # out is in the layout's compressed-token order: match through the block coords
    oc = lay.coords[lay.cmp_offsets[:-1].long()].long()
    oc = torch.cat([oc[:, :1], oc[:, 1:] // 2], 1)
    order = torch.unique(torch.cat([oc, cell]), dim=0, return_inverse=True)[1]
    ref_by_cell = torch.empty_like(ref)
    ref_by_cell[order[len(oc):]] = ref
    _close(out, ref_by_cell[order[: len(oc)]], tol=1e-6)  # SparseGroupNorm computes in float32


def test_module_with_compression_v2_triton_matches_torch(gen):
    coords = _coords(gen, shuffle=False)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen), coords)
    cfg = SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=3, compression="v2")
    mod = SpatialSparseAttention(64, 4, 2, config=cfg)
    ref = SpatialSparseAttention(64, 4, 2, config=SSAConfig(**{**cfg.__dict__, "backend": "torch"})).double()
    ref.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    y = mod(x).feats
    y_ref = ref(x.replace(x.feats.double())).feats
    _close(y, y_ref)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g.double())
    for (name, p), (_, pr) in zip(mod.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        if pr.grad.norm() > 1e-3:
            _close(p.grad, pr.grad, tol=5e-5)
        else:  # biases in front of a GroupNorm / softmax-invariant shifts: the true gradient is 0
            assert p.grad.norm() < 1e-4, name
