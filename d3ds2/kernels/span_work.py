"""The dK/dV pass's work items: their plan, built by one kernel launch (:func:`work_plan`, PyTorch reference
:func:`work_plan_reference`), and their decoding on the device (``_work_item``), shared by the Triton kernel
(d3ds2.kernels.span_backward) and the Hopper Gluon kernel (d3ds2.kernels.span_dkdv_hopper).

The plan: (ch_span, ch_start) [U] int32, the span and first key of each BK-key chunk slot (U = n_keys // BK +
S + 1 bounds the chunk count; unused slots have no work), and cum_items [Hkv * U] int32, the inclusive running
count of work items over the slots (KV head major): a slot whose span p queries selected has ceil(p / per_item).
"""
from __future__ import annotations

import torch

from .runtime import triton

PLAN_BLOCK = 1024  # spans / slots per step of the plan kernel (one program walks them all)


def work_plan_reference(span_offsets: torch.Tensor, pair_offsets: torch.Tensor, n_keys: int, block_kv: int,
                        hkv: int, per_item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plan in PyTorch: span_offsets [S+1] (S >= 1), pair_offsets [Hi*S+1] (CSR offsets of the queries that
    selected each (head, span)); returns (ch_span [U], ch_start [U], cum_items [Hkv*U]) int32."""
    soff = span_offsets.long()
    s = soff.numel() - 1
    hi = (pair_offsets.numel() - 1) // s
    dev = soff.device
    slot = torch.arange(n_keys // block_kv + s + 1, device=dev)
    n_ch = (soff[1:] - soff[:-1] + block_kv - 1) // block_kv
    cum_ch = n_ch.cumsum(0)
    span = torch.searchsorted(cum_ch, slot, right=True)
    used = span < s
    span = span.clamp(max=s - 1)
    start = soff[span] + (slot - (cum_ch[span] - n_ch[span])) * block_kv
    poff = pair_offsets.long()
    pair = (torch.arange(hkv, device=dev) % hi)[:, None] * s + span[None, :]  # [Hkv, U]
    items = torch.where(used[None, :], (poff[pair + 1] - poff[pair] + per_item - 1) // per_item, 0)
    return (span.to(torch.int32).contiguous(), start.to(torch.int32).contiguous(),
            items.flatten().cumsum(0).to(torch.int32).contiguous())


def work_plan(span_offsets: torch.Tensor, pair_offsets: torch.Tensor, n_keys: int, block_kv: int, hkv: int,
              per_item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`work_plan_reference` in one launch of ``_work_plan_kernel`` (the reference takes ~30 small ops,
    a host cost paid for every new plan: each layer's selection, self- and cross-attention); int32 inputs on
    the kernels' device."""
    s = span_offsets.numel() - 1
    u = n_keys // block_kv + s + 1
    dev = span_offsets.device
    ch_span = torch.empty(u, dtype=torch.int32, device=dev)
    ch_start = torch.empty(u, dtype=torch.int32, device=dev)
    cum_items = torch.empty(hkv * u, dtype=torch.int32, device=dev)
    cum_ch = torch.empty(s, dtype=torch.int32, device=dev)  # scratch: running chunk count per span
    _work_plan_kernel[(1,)](span_offsets, pair_offsets, cum_ch, ch_span, ch_start, cum_items, s, u,
                            BKV=block_kv, PER_ITEM=per_item, HKV=hkv, HI=(pair_offsets.numel() - 1) // s,
                            SEARCH_STEPS=max(1, s.bit_length()), BLOCK=PLAN_BLOCK, num_warps=4)
    return ch_span, ch_start, cum_items


if triton is not None:
    import triton.language as tl


    @triton.jit
    def _count_at_most(SORTED, n, x, STEPS: tl.constexpr):
        """How many of the ascending values SORTED[0:n] are <= x (a scalar or a tensor of them): the first
        index whose value exceeds x, by a binary search of STEPS >= bit_length(n) halvings."""
        lo = x * 0
        hi = x * 0 + n
        for _ in tl.static_range(STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            right = active & (tl.load(SORTED + mid, mask=active, other=0) <= x)
            hi = tl.where(active & ~right, mid, hi)
            lo = tl.where(right, mid + 1, lo)
        return lo

    @triton.jit
    def _work_plan_kernel(SOFF, POFF, CUM_CH, CH_SPAN, CH_START, CUM_ITEMS, n_spans, n_slots, BKV: tl.constexpr,
                          PER_ITEM: tl.constexpr, HKV: tl.constexpr, HI: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          BLOCK: tl.constexpr):
        """One program, three sweeps: CUM_CH = running count of BKV-key chunks per span; each slot's span (the
        first whose running count exceeds the slot: a binary search) and first key, and its item count per KV
        head into CUM_ITEMS; then CUM_ITEMS' inclusive running sum, KV head major."""
        r = tl.arange(0, BLOCK)
        carry = 0
        for s0 in range(0, n_spans, BLOCK):
            s = s0 + r
            lo = tl.load(SOFF + s, mask=s < n_spans, other=0)
            n_ch = (tl.load(SOFF + s + 1, mask=s < n_spans, other=0) - lo + BKV - 1) // BKV
            tl.store(CUM_CH + s, carry + tl.cumsum(n_ch, 0), mask=s < n_spans)
            carry += tl.sum(n_ch, 0)
        tl.debug_barrier()  # the running counts are read back by every thread below
        for u0 in range(0, n_slots, BLOCK):
            slot = u0 + r
            span = _count_at_most(CUM_CH, n_spans, slot, SEARCH_STEPS)
            used = span < n_spans
            span = tl.minimum(span, n_spans - 1)
            k_lo = tl.load(SOFF + span)
            n_ch = (tl.load(SOFF + span + 1) - k_lo + BKV - 1) // BKV
            first_slot = tl.load(CUM_CH + span) - n_ch
            in_grid = slot < n_slots
            tl.store(CH_SPAN + slot, span, mask=in_grid)
            tl.store(CH_START + slot, k_lo + (slot - first_slot) * BKV, mask=in_grid)
            for h in tl.static_range(HKV):
                pair = (h % HI) * n_spans + span
                p = tl.load(POFF + pair + 1) - tl.load(POFF + pair)
                tl.store(CUM_ITEMS + h * n_slots + slot, tl.where(used, (p + PER_ITEM - 1) // PER_ITEM, 0),
                         mask=in_grid)
        tl.debug_barrier()
        carry = 0
        for i0 in range(0, HKV * n_slots, BLOCK):
            i = i0 + r
            items = tl.load(CUM_ITEMS + i, mask=i < HKV * n_slots, other=0)
            tl.store(CUM_ITEMS + i, carry + tl.cumsum(items, 0), mask=i < HKV * n_slots)
            carry += tl.sum(items, 0)

    @triton.jit
    def _work_item(item, CUM_ITEMS, CH_SPAN, CH_START, SOFF, POFF, n_slots, n_chunk_slots, n_spans,
                   HI: tl.constexpr, PER_ITEM: tl.constexpr, SEARCH_STEPS: tl.constexpr):
        """dK/dV work item number ``item`` (scalars): its KV head, first key k0, the end k_hi of its span, and
        its range [j_lo, j_hi) of the span's selecting queries in the CSR list. The slot (KV head, chunk slot)
        is the first whose running item count CUM_ITEMS exceeds ``item`` (a binary search)."""
        slot = _count_at_most(CUM_ITEMS, n_slots, item, SEARCH_STEPS)
        first_item = tl.load(CUM_ITEMS + slot - 1, mask=slot > 0, other=0)
        kvh = slot // n_chunk_slots
        c = slot % n_chunk_slots
        span = tl.load(CH_SPAN + c)
        pair = (kvh % HI) * n_spans + span
        j_lo = tl.load(POFF + pair) + (item - first_item) * PER_ITEM
        j_hi = tl.minimum(j_lo + PER_ITEM, tl.load(POFF + pair + 1))
        return kvh, tl.load(CH_START + c), tl.load(SOFF + span + 1), j_lo, j_hi
