"""Span-attention forward: the online-softmax kernel and the *bounded* one (scores offset by a per-row
Cauchy-Schwarz bound instead of a running max, with a second launch redoing tiles whose bound was too loose),
the per-span key statistics it bounds with, and their launches (no autograd)."""
from __future__ import annotations

import torch

from .runtime import triton
from .span_common import LOG2E, SPAN_STAGES, _num_warps
from .span_plan import SpanPlan

# the bounded forward runs where the spans hold at least this many keys on average: on shorter spans (SSA's
# selection blocks and windows) the per-row bound and the extra launches cost more than the loop saves (H200:
# SSA v1.1 forward 1.56 ms bounded against 1.37 online at 3 x 10,655 tokens; full attention 4.41 against 4.91)
BOUNDED_MIN_KEYS = 1024
KEY_BOUNDS_SPLIT, KEY_BOUNDS_BLOCK = 16, 128  # programs per span and keys per step of the key-bounds kernel


def span_key_bounds(k: torch.Tensor, span_offsets: torch.Tensor) -> torch.Tensor:
    """[S, Hkv, D + 2] fp32 per span and KV head: a center c of its keys (the mean of its first 128) in
    0..D-1, max |k| in D and max |k - c| in D + 1 (L2 over the head dim; zeros for an empty span)."""
    n_spans, hkv, d = span_offsets.numel() - 1, k.shape[1], k.shape[2]
    out = torch.zeros((n_spans, hkv, d + 2), device=k.device, dtype=torch.float32)
    if n_spans and k.shape[0]:
        grid = (n_spans, KEY_BOUNDS_SPLIT, hkv)
        _span_key_bounds_kernel[grid](k, span_offsets, out, HKV=hkv, D=d, SPLIT=KEY_BOUNDS_SPLIT,
                                      BKEYS=KEY_BOUNDS_BLOCK, num_warps=4)
    return out


def span_forward(q, k, v, plan: SpanPlan, scale: float, block_k: int = 64, q_index: torch.Tensor | None = None,
                 bounded: bool | None = None):
    """Forward kernel launch (no autograd): (o like q, lse2 [Nq, Hq] fp32 in log2 units).

    Plan row i is q row ``q_index[i]`` (a permutation of the rows; None = identity); o and lse2 are
    written in q's row order. ``bounded`` (default: where the spans average at least
    ``BOUNDED_MIN_KEYS`` keys): offset each row's scores by a Cauchy-Schwarz bound on them instead of a
    running max (fewer instructions per score), then redo the tiles whose bound was too loose with the
    running max (a second launch; its programs exit at once on the other tiles). Not for fp16: p = exp2(c s
    - b) <= 1 is rounded to q's dtype for P @ V, and fp16's 5-bit exponent would flush what bf16 and fp32 keep.
    """
    o = torch.empty_like(q)
    lse2 = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    if bounded is None:
        bounded = k.shape[0] >= BOUNDED_MIN_KEYS * max(1, plan.n_spans)
    if bounded and scale > 0 and q.dtype != torch.float16:
        bounds = span_key_bounds(k, plan.span_offsets)
        redo = torch.empty((plan.union.shape[1], k.shape[1]), device=q.device, dtype=torch.int32)
        _forward_launch(q, k, v, o, lse2, plan, scale, block_k, q_index, 1, bounds, redo)
        _forward_launch(q, k, v, o, lse2, plan, scale, block_k, q_index, 2, bounds, redo)
    else:
        _forward_launch(q, k, v, o, lse2, plan, scale, block_k, q_index, 0)
    return o, lse2


def _forward_launch(q, k, v, o, lse2, plan: SpanPlan, scale: float, block_k: int, q_index, mode: int,
                    bounds: torch.Tensor | None = None, redo: torch.Tensor | None = None) -> None:
    """One launch of the forward kernel in ``mode`` (see ``_span_fwd_kernel``) writing o and lse2; ``bounds``
    (:func:`span_key_bounds`) and ``redo`` [tiles, Hkv] int32 for modes 1 and 2."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    hi, topk = plan.idx.shape[1], plan.idx.shape[2]
    n_tiles = plan.union.shape[1]
    qidx = plan.idx if q_index is None else q_index
    _span_fwd_kernel[(n_tiles, hkv)](
        q, k, v, o, lse2, qidx, plan.idx, plan.union, plan.union_count, plan.union_full, plan.span_offsets,
        lse2 if bounds is None else bounds, lse2 if redo is None else redo, nq, n_tiles, scale * LOG2E, HQ=hq,
        HKV=hkv, HI=hi, G=g, D=d, TOPK=topk, TOPK_P=triton.next_power_of_2(topk), UMAX=plan.union.shape[2],
        BM=plan.block_m, BK=block_k, HAS_QIDX=q_index is not None, MODE=mode,
        num_warps=_num_warps(plan.block_m * g, d), num_stages=SPAN_STAGES)



if triton is not None:
    import triton.language as tl

    from .span_common import _tile_rows, _tile_span

    # a bounded forward's row sum below this (2^-64) means its bound exceeds the row's largest score by more
    # than 64 log2 units: scores 62 more below it would flush to zero in fp32, so the tile is redone
    BOUND_SUM_MIN = tl.constexpr(2.0 ** -64)
    @triton.jit
    def _span_key_bounds_kernel(K, SOFF, KB, HKV: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                                BKEYS: tl.constexpr):
        """KB [S, HKV, D + 2] fp32 (zeroed) <- per span and KV head: a center c (the mean of the span's first
        BKEYS keys) in columns 0..D-1, max |k| in column D and max |k - c| in column D + 1, by atomic max.
        Program (s, j, h) takes the key chunks j, j + SPLIT, ... of span s, head h; all compute the same c."""
        s = tl.program_id(0)
        h = tl.program_id(2)
        lo = tl.load(SOFF + s)
        hi = tl.load(SOFF + s + 1)
        kn = tl.arange(0, BKEYS)
        d = tl.arange(0, D)
        first = lo + kn < hi
        x0 = tl.load(K + ((lo + kn)[:, None] * HKV + h) * D + d[None, :], mask=first[:, None], other=0.0)
        center = tl.sum(x0.to(tl.float32), 0) / tl.maximum(tl.sum(first.to(tl.float32), 0), 1.0)
        row = KB + (s * HKV + h) * (D + 2)
        if tl.program_id(1) == 0:
            tl.store(row + d, center)
        for k0 in range(lo + tl.program_id(1) * BKEYS, hi, SPLIT * BKEYS):
            keys = k0 + kn
            x = tl.load(K + (keys[:, None] * HKV + h) * D + d[None, :], mask=(keys < hi)[:, None],
                        other=0.0).to(tl.float32)
            off = tl.where((keys < hi)[:, None], x - center[None, :], 0.0)
            tl.atomic_max(row + D, tl.max(tl.sqrt(tl.sum(x * x, 1)), 0), sem="relaxed")
            tl.atomic_max(row + D + 1, tl.max(tl.sqrt(tl.sum(off * off, 1)), 0), sem="relaxed")

    @triton.jit
    def _span_fwd_kernel(Q, K, V, O, LSE, QIDX, IDX, UNION, UCNT, UFULL, SOFF, KB, REDO, n_q, n_tiles,
                         sm_scale_log2,
                         HQ: tl.constexpr, HKV: tl.constexpr, HI: tl.constexpr, G: tl.constexpr,
                         D: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr, UMAX: tl.constexpr,
                         BM: tl.constexpr, BK: tl.constexpr, HAS_QIDX: tl.constexpr, MODE: tl.constexpr):
        """MODE 0: online softmax (running row max, rescaled accumulators). MODE 1, *bounded*: every score
        is offset by a fixed per-row bound b >= c q.k over the row's selected spans, the smaller of c |q| max|k|
        and c (q.center + |q| max|k - center|) from KB (:func:`span_key_bounds`), so p = exp2(c s - b) <= 1
        needs no running max; REDO [n_tiles, HKV] gets 1 where a row's sum fell below 2^-64, i.e. the bound
        lies so far above the scores that fp32 would flush them. MODE 2: MODE 0 on the tiles REDO marks (the
        others return at once)."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        if MODE == 2:
            if tl.load(REDO + tile * HKV + kvh) == 0:
                return
        hi = kvh % HI
        R: tl.constexpr = BM * G
        qi, hq, rmask, qrow = _tile_rows(QIDX, tile, kvh, n_q, BM, G, HAS_QIDX)
        d = tl.arange(0, D)
        q = tl.load(Q + (qrow[:, None] * HQ + hq[:, None]) * D + d[None, :], mask=rmask[:, None], other=0.0)
        t = tl.arange(0, TOPK_P)
        sel = tl.load(IDX + (qi[:, None] * HI + hi) * TOPK + t[None, :],
                      mask=rmask[:, None] & (t[None, :] < TOPK), other=-1)
        if MODE == 1:  # the row's bound on its scaled (log2) scores, by Cauchy-Schwarz about 0 and a center
            qf = q.to(tl.float32)
            qn = tl.sqrt(tl.sum(qf * qf, 1))
            m_i = tl.full([R], float("-inf"), tl.float32)
            for t_ in tl.static_range(TOPK):
                span = tl.load(IDX + (qi * HI + hi) * TOPK + t_, mask=rmask, other=-1)
                row = KB + (tl.maximum(span, 0) * HKV + kvh) * (D + 2)
                center = tl.load(row[:, None] + d[None, :], mask=(span >= 0)[:, None], other=0.0)
                around = tl.sum(qf * center, 1) + qn * tl.load(row + D + 1, mask=span >= 0, other=0.0)
                bound = tl.minimum(qn * tl.load(row + D, mask=span >= 0, other=0.0), around)
                m_i = tl.maximum(m_i, tl.where(span >= 0, bound, float("-inf")))
            m_i = tl.where(m_i > float("-inf"), m_i * sm_scale_log2, 0.0)  # 0: a row without spans
        else:
            m_i = tl.full([R], -1.0e30, tl.float32)  # running max of the scaled (log2) scores
        l_i = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D], tl.float32)
        n_u = tl.load(UCNT + hi * n_tiles + tile)
        for u in range(0, n_u):
            row_sel, all_rows, k_lo, k_hi = _tile_span(UNION, UFULL, SOFF, sel, (hi * n_tiles + tile) * UMAX + u)
            for k0 in range(k_lo, k_hi, BK):
                kn = k0 + tl.arange(0, BK)
                kmask = kn < k_hi
                kt = tl.load(K + (kn[None, :] * HKV + kvh) * D + d[:, None], mask=kmask[None, :], other=0.0)
                s = tl.dot(q, kt)
                if (k0 + BK > k_hi) | (all_rows == 0):  # masking only where some row or key is out
                    s = tl.where(row_sel[:, None] & kmask[None, :], s, float("-inf"))
                vv = tl.load(V + (kn[:, None] * HKV + kvh) * D + d[None, :], mask=kmask[:, None], other=0.0)
                if MODE == 1:
                    p = tl.math.exp2(s * sm_scale_log2 - m_i[:, None])
                    l_i += tl.sum(p, 1)
                    acc += tl.dot(p.to(vv.dtype), vv)
                else:
                    m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
                    alpha = tl.math.exp2(m_i - m_new)
                    p = tl.math.exp2(s * sm_scale_log2 - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
                    m_i = m_new
        if MODE == 1:
            far = rmask & (tl.max(sel, 1) >= 0) & (l_i < BOUND_SUM_MIN)
            tl.store(REDO + tile * HKV + kvh, tl.max(far.to(tl.int32), 0))
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(O + (qrow[:, None] * HQ + hq[:, None]) * D + d[None, :], o.to(O.dtype.element_ty),
                 mask=rmask[:, None])
        lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(LSE + qrow * HQ + hq, lse2, mask=rmask)
