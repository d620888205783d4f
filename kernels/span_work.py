"""The dK/dV pass's work items, found on the device: shared by the Triton kernel (kernels.span_attention) and
the Hopper Gluon kernel (kernels.span_dkdv_hopper)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU machines
    triton = None

if triton is not None:

    @triton.jit
    def _work_item(item, CUM_ITEMS, CH_SPAN, CH_START, SOFF, POFF, n_slots, n_chunk_slots, n_spans,
                   HI: tl.constexpr, PER_ITEM: tl.constexpr, SEARCH_STEPS: tl.constexpr):
        """dK/dV work item number ``item`` (scalars): its KV head, first key k0, the end k_hi of its span, and
        its range [j_lo, j_hi) of the span's selecting queries in the CSR list. The slot (KV head, chunk slot)
        is the first whose running item count CUM_ITEMS exceeds ``item`` (a binary search)."""
        lo = 0
        hi = n_slots
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            right = active & (tl.load(CUM_ITEMS + mid, mask=active, other=0) <= item)
            hi = tl.where(active & ~right, mid, hi)
            lo = tl.where(right, mid + 1, lo)
        slot = lo
        first_item = tl.load(CUM_ITEMS + slot - 1, mask=slot > 0, other=0)
        kvh = slot // n_chunk_slots
        c = slot % n_chunk_slots
        span = tl.load(CH_SPAN + c)
        pair = (kvh % HI) * n_spans + span
        j_lo = tl.load(POFF + pair) + (item - first_item) * PER_ITEM
        j_hi = tl.minimum(j_lo + PER_ITEM, tl.load(POFF + pair + 1))
        return kvh, tl.load(CH_START + c), tl.load(SOFF + span + 1), j_lo, j_hi
