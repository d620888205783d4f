"""What the span-attention kernels share: log constants, launch shapes, and the Triton
helpers that map a tile's rows to q rows and walk a tile's union of spans (see :mod:`d3ds2.kernels.span_attention`)."""
from __future__ import annotations

from .runtime import triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SPAN_STAGES = 3  # software-pipeline depth of the kernel loops (H200, d 32: fwd 5.05 -> 4.77 ms, dQ 5.50 -> 5.17)


def _num_warps(rows: int, d: int) -> int:
    return 8 if rows * d >= 128 * 64 else 4


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _query_rows(QIDX, qi, rmask, HAS_QIDX: tl.constexpr):
        """Row of each plan query in q/o/lse/dO/dQ: QIDX[qi] (a permutation of the rows) or qi itself."""
        if HAS_QIDX:
            return tl.load(QIDX + qi, mask=rmask, other=0)
        else:
            return qi

    @triton.jit
    def _tile_rows(QIDX, tile, kvh, n_q, BM: tl.constexpr, G: tl.constexpr, HAS_QIDX: tl.constexpr):
        """The BM * G rows of a forward / dQ tile (BM queries x the G q heads of KV head kvh): each row's plan
        query qi, q head hq, validity rmask and row in q / o / lse (qrow)."""
        r = tl.arange(0, BM * G)
        qi = tile * BM + r // G
        hq = kvh * G + r % G
        rmask = qi < n_q
        return qi, hq, rmask, _query_rows(QIDX, qi, rmask, HAS_QIDX)

    @triton.jit
    def _tile_span(UNION, UFULL, SOFF, sel, slot):
        """Span number `slot` of a tile's union list: which rows selected it (row_sel [R]), whether all of
        them did (all_rows), and its key range [k_lo, k_hi)."""
        span = tl.load(UNION + slot)
        row_sel = tl.sum((sel == span).to(tl.int32), axis=1) > 0
        all_rows = tl.load(UFULL + slot)
        return row_sel, all_rows, tl.load(SOFF + span), tl.load(SOFF + span + 1)
