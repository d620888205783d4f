"""Span-attention backward (no autograd): the dQ kernel (which also writes delta and the folded columns) and
the persistent dK/dV kernel over device-built work items, or its Hopper Gluon version
(:mod:`d3ds2.kernels.span_dkdv_hopper`) where that one can run."""
from __future__ import annotations

import torch

from .runtime import sm_count, triton
from .span_common import LOG2E, SPAN_STAGES, _num_warps
from .span_dkdv_hopper import hopper_dkdv_usable, span_dkdv_hopper
from .span_plan import SpanPlan
from .span_work import work_plan

ROWS_PER_ITEM = 16384  # q rows (selecting queries x the q heads of a KV head) per dK/dV work item
PROGRAMS_PER_SM = 4  # persistent dK/dV programs per multiprocessor (2, 4, 8: the same speed on an H200)
INTERPRET_PROGRAMS = 3  # persistent programs under the CPU interpreter (each takes several items)


def _work_plan(plan: SpanPlan, block_kv: int, hkv: int, n_keys: int, per_item: int):
    """The persistent dK/dV kernel's work plan (:func:`d3ds2.kernels.span_work.work_plan`), built on the device without
    a host sync and cached on the plan."""
    key = (block_kv, hkv, n_keys, per_item)
    if key not in plan.work:
        if plan.n_spans == 0:  # nothing to attend to: no work
            u = n_keys // block_kv + 1
            zeros = torch.zeros(u, dtype=torch.int32, device=plan.span_offsets.device)
            plan.work[key] = (zeros, zeros, torch.zeros(hkv * u, dtype=torch.int32, device=zeros.device))
        else:
            plan.work[key] = work_plan(plan.span_offsets, plan.pairs()[0], n_keys, block_kv, hkv, per_item)
    return plan.work[key]


MIN_BLOCK_KV_SM90 = 64  # dK/dV keys per tile on Hopper: the rows (M) of its wgmma; fewer compile to mma.sync


def _check_block_kv(q: torch.Tensor, block_kv: int) -> None:
    """On Hopper, a dK/dV tile of fewer than 64 keys falls back to mma.sync and spills: block_kv 32 took
    525 ms instead of 8.5 (3 x 10,655 tokens, H200, docs/benchmarks.md), so it is refused, not run."""
    if q.is_cuda and block_kv < MIN_BLOCK_KV_SM90 and torch.cuda.get_device_capability(q.device)[0] == 9:
        raise ValueError(f"span_attention: block_kv={block_kv} is below {MIN_BLOCK_KV_SM90} on this sm_90 GPU; "
                         f"such dK/dV tiles compile to mma.sync with register spills (60x slower). "
                         f"Use block_kv >= {MIN_BLOCK_KV_SM90} (default 64)")


def _persistent_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return PROGRAMS_PER_SM * sm_count(device)


def span_backward(do, q, k, v, o, lse2, plan: SpanPlan, scale: float, block_k: int = 64, block_q: int | None = None,
                  block_kv: int = 64, *, q_index: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None):
    """Backward kernel launches (no autograd) for the output ``gate[:, None, None] * o`` (gate [Nq] per q
    row, None = 1) with upstream gradient ``do``. Returns (dq, dk, dv, delta):

    dq like q, added to the given ``dq`` when there is one (else new); dk / dv fp32 [Nk, Hkv, D], added to
    the given fp32 accumulators (else new); delta [Nq, Hq] fp32 = rowsum(o * do), so that the gate's
    gradient is delta.sum(1). ``q_index`` as in :func:`span_forward`.
    """
    _check_block_kv(q, block_kv)
    nq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    hi, topk = plan.idx.shape[1], plan.idx.shape[2]
    block_q = block_q or max(1, 128 // g)
    do = do.contiguous()
    delta = torch.empty((nq, hq), device=q.device, dtype=torch.float32)
    acc = dq is not None
    dq = torch.empty_like(q) if dq is None else dq
    qidx = plan.idx if q_index is None else q_index
    if gate is not None:  # p * gate = exp2(s - (lse2 - log2(gate))): the kernels then differentiate gate * o
        lse2 = lse2 - torch.log2(gate.float())[:, None]
    n_tiles = plan.union.shape[1]
    bm = plan.block_m
    cols = torch.empty((nq, hq, 16), device=q.device, dtype=q.dtype)
    _span_bwd_dq_kernel[(n_tiles, hkv)](
        q, k, v, o, do, lse2, delta, cols, dq, qidx, plan.idx, plan.union, plan.union_count, plan.union_full,
        plan.span_offsets, nq, n_tiles, scale, scale * LOG2E, HQ=hq, HKV=hkv, HI=hi, G=g, D=d, TOPK=topk,
        TOPK_P=triton.next_power_of_2(topk), UMAX=plan.union.shape[2], BM=bm, BK=block_k, ACC=acc,
        HAS_QIDX=q_index is not None, num_warps=_num_warps(bm * g, d), num_stages=SPAN_STAGES)
    poff, pq = plan.pairs()
    per_item = max(1, ROWS_PER_ITEM // g)  # queries per item: 1024 at 16 q heads per KV head, 16,384 at 1
    ch_span, ch_start, cum_items = _work_plan(plan, block_kv, hkv, k.shape[0], per_item)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32) if dk is None else dk
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32) if dv is None else dv
    n_slots = cum_items.numel()
    next_item = torch.zeros(1, device=q.device, dtype=torch.int32)
    args = (q, k, v, do, cols, dk, dv, qidx, ch_span, ch_start, plan.span_offsets, poff, pq, cum_items, next_item,
            n_slots, ch_span.numel(), plan.n_spans, scale, scale * LOG2E)
    shape = dict(HQ=hq, HKV=hkv, HI=hi, G=g, D=d, BQ=block_q, BK=block_kv, PER_ITEM=per_item,
                 SEARCH_STEPS=n_slots.bit_length(), HAS_QIDX=q_index is not None)
    grid = (_persistent_programs(q.device),)
    if hopper_dkdv_usable(q, block_q * g, block_kv):
        span_dkdv_hopper(grid, args, shape)
    else:
        _span_bwd_dkdv_kernel[grid](*args, **shape, num_warps=_num_warps(block_q * g, d), num_stages=SPAN_STAGES)
    return dq, dk, dv, delta



if triton is not None:
    import triton.language as tl

    from .span_common import _query_rows, _tile_rows, _tile_span
    from .span_work import _work_item

    @triton.jit
    def _span_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, COLS, DQ, QIDX, IDX, UNION, UCNT, UFULL, SOFF, n_q, n_tiles,
                            sm_scale, sm_scale_log2,
                            HQ: tl.constexpr, HKV: tl.constexpr, HI: tl.constexpr, G: tl.constexpr,
                            D: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr, UMAX: tl.constexpr,
                            BM: tl.constexpr, BK: tl.constexpr, HAS_QIDX: tl.constexpr, ACC: tl.constexpr):
        """dQ (added to DQ if ACC), DELTA = rowsum(o * dO) and the folded columns COLS [Nq, Hq, 16] of the
        dK/dV pass: split(lse2 / c) in columns 0..7 and split(delta) in 8..15 (see _split3). LSE may carry a
        gate: LSE - log2(gate) makes p the gated probabilities, hence dQ, dK, dV those of gate * o."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        hi = kvh % HI
        R: tl.constexpr = BM * G
        qi, hq, rmask, qrow = _tile_rows(QIDX, tile, kvh, n_q, BM, G, HAS_QIDX)
        d = tl.arange(0, D)
        rows = (qrow[:, None] * HQ + hq[:, None]) * D + d[None, :]
        q = tl.load(Q + rows, mask=rmask[:, None], other=0.0)
        do = tl.load(DO + rows, mask=rmask[:, None], other=0.0)
        o = tl.load(O + rows, mask=rmask[:, None], other=0.0)
        lse2 = tl.load(LSE + qrow * HQ + hq, mask=rmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # rowsum(o * do), reused by dK/dV
        tl.store(DELTA + qrow * HQ + hq, delta, mask=rmask)
        e = tl.arange(0, 16)
        cols = tl.where(e[None, :] < 8, _split3(lse2 / sm_scale_log2, e), _split3(delta, e - 8))
        tl.store(COLS + (qrow[:, None] * HQ + hq[:, None]) * 16 + e[None, :], cols.to(COLS.dtype.element_ty),
                 mask=rmask[:, None])
        t = tl.arange(0, TOPK_P)
        sel = tl.load(IDX + (qi[:, None] * HI + hi) * TOPK + t[None, :],
                      mask=rmask[:, None] & (t[None, :] < TOPK), other=-1)
        # dp - delta as one matmul, [dO | split(delta)] @ [V^T ; -1s]: one FADD less per score
        xd = _split3(delta, e).to(do.dtype)
        minus_t = tl.where(e[:, None] < 8, -1.0, 0.0).to(K.dtype.element_ty) + tl.zeros([16, BK], K.dtype.element_ty)
        dq = tl.zeros([R, D], tl.float32)
        n_u = tl.load(UCNT + hi * n_tiles + tile)
        for u in range(0, n_u):
            row_sel, all_rows, k_lo, k_hi = _tile_span(UNION, UFULL, SOFF, sel, (hi * n_tiles + tile) * UMAX + u)
            for k0 in range(k_lo, k_hi, BK):
                kn = k0 + tl.arange(0, BK)
                kmask = kn < k_hi
                kt = tl.load(K + (kn[None, :] * HKV + kvh) * D + d[:, None], mask=kmask[None, :], other=0.0)
                vt = tl.load(V + (kn[None, :] * HKV + kvh) * D + d[:, None], mask=kmask[None, :], other=0.0)
                p = tl.math.exp2(tl.dot(q, kt) * sm_scale_log2 - lse2[:, None])
                if (k0 + BK > k_hi) | (all_rows == 0):
                    p = tl.where(row_sel[:, None] & kmask[None, :], p, 0.0)
                ds = p * tl.dot(xd, minus_t, tl.dot(do, vt))
                dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
        dq = dq * sm_scale
        if ACC:
            dq += tl.load(DQ + rows, mask=rmask[:, None], other=0.0).to(tl.float32)
        tl.store(DQ + rows, dq.to(DQ.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _split3(x, e):
        """x [R] fp32 -> [R, E]: three bf16-exact terms hi + mid + lo = x (24 bits) in columns 0..2, zeros
        elsewhere (non-finite x: x, 0, 0). A matmul against -1s in those columns subtracts x in fp32. The
        terms are exact in bf16, tf32 and fp32, and in fp16 while |x| < 65504 (a log-sum-exp over the scale
        of that size means raw scores beyond 10^4)."""
        finite = tl.abs(x) < float("inf")
        xf = tl.where(finite, x, 0.0)
        hi = xf.to(tl.bfloat16).to(tl.float32)
        mid = (xf - hi).to(tl.bfloat16).to(tl.float32)
        lo = (xf - hi - mid).to(tl.bfloat16).to(tl.float32)
        hi = tl.where(finite, hi, x)
        return tl.where(e[None, :] == 0, hi[:, None], tl.where(e[None, :] == 1, mid[:, None],
                                                               tl.where(e[None, :] == 2, lo[:, None], 0.0)))

    @triton.jit
    def _span_bwd_dkdv_kernel(Q, K, V, DO, COLS, DK, DV, QIDX, CH_SPAN, CH_START, SOFF, POFF, PQ, CUM_ITEMS,
                              NEXT_ITEM, n_slots, n_chunk_slots, n_spans, sm_scale, sm_scale_log2,
                              HQ: tl.constexpr, HKV: tl.constexpr, HI: tl.constexpr, G: tl.constexpr,
                              D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PER_ITEM: tl.constexpr,
                              SEARCH_STEPS: tl.constexpr, HAS_QIDX: tl.constexpr):
        """dK/dV of key chunks from the queries that selected them (fp32 atomics). Persistent: each program
        takes the next work item from the counter NEXT_ITEM until none is left, so the item count stays on
        the device (no host sync) and the load balances itself. A slot = (KV head, chunk slot); CUM_ITEMS
        [n_slots] is the inclusive running count of items per slot, and an item = (slot, up to PER_ITEM
        consecutive selecting queries) is found by a binary search of it. COLS [Nq, Hq, 16] holds each q row's
        split lse2 / c and delta (see the dQ kernel), which a [BK, 16] block of -1s subtracts inside the score
        matmuls: the loop gets c*S - lse2 and dP - delta from the tensor cores, not from per-column vectors."""
        n_items = tl.load(CUM_ITEMS + n_slots - 1)
        d = tl.arange(0, D)
        R: tl.constexpr = BQ * G
        r = tl.arange(0, R)
        item = tl.atomic_add(NEXT_ITEM, 1)
        e = tl.arange(0, 16)
        minus = tl.where(e[None, :] < 8, -1.0, 0.0).to(K.dtype.element_ty) + tl.zeros([BK, 16], K.dtype.element_ty)
        emask = e[None, :] < 8
        while item < n_items:
            kvh, k0, k_hi, j_lo, j_hi = _work_item(item, CUM_ITEMS, CH_SPAN, CH_START, SOFF, POFF, n_slots,
                                                   n_chunk_slots, n_spans, HI, PER_ITEM, SEARCH_STEPS)
            kn = k0 + tl.arange(0, BK)
            kmask = kn < k_hi
            part_keys = k0 + BK > k_hi
            kv_off = (kn[:, None] * HKV + kvh) * D + d[None, :]
            k = tl.load(K + kv_off, mask=kmask[:, None], other=0.0)
            v = tl.load(V + kv_off, mask=kmask[:, None], other=0.0)
            hq = kvh * G + r % G
            dk = tl.zeros([BK, D], tl.float32)
            dv = tl.zeros([BK, D], tl.float32)
            for j0 in range(j_lo, j_hi, BQ):
                jj = j0 + r // G
                jm = jj < j_hi
                qrow = _query_rows(QIDX, tl.load(PQ + jj, mask=jm, other=0), jm, HAS_QIDX)
                rows = (qrow[:, None] * HQ + hq[:, None]) * D + d[None, :]
                q = tl.load(Q + rows, mask=jm[:, None], other=0.0)
                do = tl.load(DO + rows, mask=jm[:, None], other=0.0)
                xrow = (qrow[:, None] * HQ + hq[:, None]) * 16 + e[None, :]
                xl = tl.load(COLS + xrow, mask=jm[:, None] & emask, other=0.0)
                xd = tl.load(COLS + xrow + 8, mask=jm[:, None] & emask, other=0.0)
                pt = tl.math.exp2(tl.dot(minus, tl.trans(xl), tl.dot(k, tl.trans(q))) * sm_scale_log2)
                if (j0 + BQ > j_hi) | part_keys:
                    pt = tl.where(kmask[:, None] & jm[None, :], pt, 0.0)
                dv += tl.dot(pt.to(do.dtype), do)
                dst = pt * tl.dot(minus, tl.trans(xd), tl.dot(v, tl.trans(do)))
                dk += tl.dot(dst.to(q.dtype), q)
            tl.atomic_add(DK + kv_off, dk * sm_scale, mask=kmask[:, None], sem="relaxed")
            tl.atomic_add(DV + kv_off, dv, mask=kmask[:, None], sem="relaxed")
            item = tl.atomic_add(NEXT_ITEM, 1)
