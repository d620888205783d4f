"""Span attention: each query attends to the key tokens of a few selected *spans* (contiguous key ranges).

One kernel family serves every sparse attention of the project:
- SSA selection: spans = selection blocks; each (query, KV head) selects its top-k blocks;
- SSA compression / varlen full attention: spans = samples; each query selects its own sample's keys;
- window attention: spans = windows; each query selects its own window.

Shapes: q [Nq, Hq, D], k/v [Nk, Hkv, D] (GQA, Hq = G * Hkv), ``idx`` int32 [Nq, Hi, TOPK] span ids
(-1 = none) with Hi = 1 (shared by the KV heads) or Hi = Hkv, ``span_offsets`` int32 [S + 1] (span s holds
keys span_offsets[s]:span_offsets[s+1]). Output o [Nq, Hq, D] and the softmax log-sum-exp [Nq, Hq]
(natural log). A query that selects no key gets o = 0 and lse = -inf.

Kernel design (Triton, fp16/bf16/fp32, head dim 16..128):
- forward and dQ: one program per (tile of BM consecutive queries x G heads sharing a KV head); rows =
  BM * G so ``tl.dot`` runs on tensor cores. The program loops over the *union* of the spans its queries
  selected (precomputed, sorted, deduplicated: O(N * TOPK) ints) in BK-key chunks; rows of queries that
  did not select a span and keys past its end are masked, and chunks where every row selected the span
  and every key is inside it skip the masking. Softmax in base 2, the scale folded into the exponent's FMA.
  Where the spans are long (full attention, cross-attention), the forward offsets each row's scores by a
  precomputed bound instead of a running max, b = c * min(|q| max|k|, q.center + |q| max|k - center|)
  over the row's spans (Cauchy-Schwarz; per-span key statistics from one small kernel), which drops the row
  max, its shuffles and the rescaling from the loop; tiles whose bound lies more than ~64 log2 units above
  their scores (fp32 would flush them) are redone with the online softmax by a second launch.
- dK/dV: work items = (BK-key chunk of a span, KV head, up to 1024 of the queries that selected the span);
  the queries come from a CSR list built by one argsort of ``idx`` (the identity for spans = samples/
  windows) and are gathered BQ at a time; dK/dV accumulate in fp32 registers and are added with fp32
  atomics (a span chosen by many queries is split over many items: balanced). The item count stays on the
  device: a fixed grid of persistent programs takes items from an atomic counter (no host sync in the
  backward). On Hopper the same work runs in a Gluon kernel with asynchronous wgmma
  (:mod:`d3ds2.kernels.span_dkdv_hopper`).
  delta = rowsum(o * dO) is computed by the dQ kernel, which runs first; it also writes each row's
  lse / scale and delta as three bf16-exact terms, so that the dK/dV pass subtracts them in its matmuls.
- ``q_index``: plan row i may be q row q_index[i] (a permutation), so a plan built over regrouped queries
  (shifted windows) reads q and writes o, lse, dQ in place without copies.
- :func:`span_backward` differentiates gate[:, None, None] * o for a per-row gate by subtracting
  log2(gate) from the log-sum-exp (the probabilities become the gated ones), and can add dQ / dK / dV to
  existing buffers: several gated branches over one q share one dQ (used by SSA).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional on CPU machines
    triton = None

from d3ds2.kernels.span_dkdv_hopper import hopper_dkdv_usable, span_dkdv_hopper
from d3ds2.kernels.span_work import work_plan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def triton_usable(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like ``t`` (CUDA, or the CPU interpreter)."""
    return triton is not None and (t.is_cuda or INTERPRET)


# ----------------------------------------------------------------------------------------------
# Plan: what the kernels need besides q/k/v (built once per idx, reused by forward and backward)
# ----------------------------------------------------------------------------------------------
@dataclass
class SpanPlan:
    """Index structures for one ``idx``.

    idx [Nq, Hi, TOPK] int32; span_offsets [S+1] int32; block_m queries per forward tile;
    union [Hi, T, BM*TOPK] int32 sorted unique spans of each tile (padding -1), union_count [Hi, T],
    union_full [Hi, T, BM*TOPK] int8: 1 where every query of the tile selected that span;
    pair_offsets [Hi*S+1] int32 / pair_query [P] int32: the queries that selected each (head, span);
    work: the dK/dV kernel's chunk slots and item counts per tile shape (see :mod:`d3ds2.kernels.span_work`).
    """

    idx: torch.Tensor
    span_offsets: torch.Tensor
    block_m: int
    union: torch.Tensor
    union_count: torch.Tensor
    union_full: torch.Tensor
    pair_offsets: torch.Tensor | None = None
    pair_query: torch.Tensor | None = None
    query_offsets: torch.Tensor | None = None
    work: dict = field(default_factory=dict)

    @property
    def n_spans(self) -> int:
        return self.span_offsets.numel() - 1

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR (pair_offsets, pair_query) of the queries that selected each (head, span); built lazily."""
        if self.pair_offsets is None:
            if self.query_offsets is not None:  # queries are grouped by their single span
                self.pair_offsets = self.query_offsets.to(torch.int32)
                self.pair_query = torch.arange(self.idx.shape[0], device=self.idx.device, dtype=torch.int32)
            else:
                self.pair_offsets, self.pair_query = _build_pairs(self.idx, self.n_spans)
        return self.pair_offsets, self.pair_query


def _tile_unions(idx: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted unique span ids of each tile of ``block_m`` queries: ([Hi, T, BM*TOPK] padded -1, [Hi, T], and
    [Hi, T, BM*TOPK] int8 flags: every query of the tile selected the span, so the kernels need no mask)."""
    n, hi, topk = idx.shape
    t = (n + block_m - 1) // block_m
    big = torch.iinfo(torch.int32).max
    x = torch.full((t * block_m, hi, topk), -1, dtype=torch.int32, device=idx.device)
    x[:n] = idx
    x = x.view(t, block_m, hi, topk).permute(2, 0, 1, 3).reshape(hi, t, block_m * topk)
    x = torch.where(x < 0, big, x)
    s = x.sort(dim=-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    # selections per unique span (a query lists a span at most once): runs of the sorted ids, in order
    run = (~dup).cumsum(-1) - 1
    per_span = torch.zeros_like(run).scatter_add_(-1, run, torch.ones_like(run))
    s = torch.where(dup, big, s).sort(dim=-1).values
    count = (s != big).sum(-1).to(torch.int32)
    queries = (n - torch.arange(t, device=idx.device) * block_m).clamp(max=block_m)  # queries per tile
    full = ((per_span == queries.view(1, t, 1)) & (s != big)).to(torch.int8).contiguous()
    s = torch.where(s == big, -1, s).to(torch.int32).contiguous()
    return s, count.contiguous(), full


def _build_pairs(idx: torch.Tensor, n_spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the queries that selected each (head, span): offsets [Hi*S+1] int32, queries [P] int32.

    Queries of one span are in ascending order (stable sort); the -1 pads sort last. No host sync: the
    offsets come from a binary search of the sorted keys (bincount would read the largest key on the host).
    """
    n, hi, topk = idx.shape
    flat = idx.permute(1, 0, 2).reshape(hi, n * topk).to(torch.int32)
    head = torch.arange(hi, device=idx.device, dtype=torch.int32).view(hi, 1)
    key = torch.where(flat >= 0, head * n_spans + flat, hi * n_spans).reshape(-1)  # int32: half the radix passes
    key, order = torch.sort(key, stable=True)
    query = ((order % (n * topk)) // topk).to(torch.int32)
    offsets = torch.searchsorted(key, torch.arange(hi * n_spans + 1, device=idx.device, dtype=torch.int32),
                                 out_int32=True)
    return offsets, query.contiguous()


UNION_ELEMENTS = 1024  # ids per program of the tile-union kernel (tiles of BM*TOPK ids padded to a power of 2)


def _tile_unions_triton(idx: torch.Tensor, block_m: int, minmax_sort: bool = INTERPRET
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_tile_unions` in one Triton pass (same outputs): several tiles per program, each tile's
    BM*TOPK ids sorted, deduplicated and compacted in registers. ``minmax_sort``: sort with the kernel's
    min/max bitonic network instead of ``tl.sort`` (whose pair exchanges the interpreter runs element by
    element in Python): the interpreter's sort only, the default there; it does not compile for a GPU (its
    loop reassigns a constexpr, which the compiler rejects)."""
    if minmax_sort and not INTERPRET:
        raise ValueError("minmax_sort is the CPU interpreter's sort; compiled kernels use tl.sort")
    n, hi, topk = idx.shape
    t = (n + block_m - 1) // block_m
    width = block_m * topk
    union = torch.empty((hi, t, width), dtype=torch.int32, device=idx.device)
    count = torch.empty((hi, t), dtype=torch.int32, device=idx.device)
    full = torch.empty((hi, t, width), dtype=torch.int8, device=idx.device)
    if t:
        w_p = triton.next_power_of_2(width)
        tt = max(1, UNION_ELEMENTS // w_p)
        _tile_unions_kernel[(triton.cdiv(t, tt), hi)](idx, union, count, full, n, t, HI=hi, TOPK=topk, BM=block_m,
                                                       W_P=w_p, LOG_W=w_p.bit_length() - 1, TT=tt,
                                                       MINMAX_SORT=minmax_sort, num_warps=4)
    return union, count, full


def plan_spans(idx: torch.Tensor, span_offsets: torch.Tensor, block_m: int,
               query_offsets: torch.Tensor | None = None, *, check_unique: bool = True) -> SpanPlan:
    """Build the plan for ``idx`` [Nq, Hi, TOPK] (int) over spans ``span_offsets`` [S+1].

    ``query_offsets`` [S+1]: pass it when every query selects exactly one span and the queries of span s
    are the contiguous range query_offsets[s]:query_offsets[s+1] (samples, windows); it replaces a sort.
    A query lists a span at most once per head (-1 pads may repeat); ``check_unique`` verifies it (one
    host sync; pass False for ids unique by construction, e.g. a top-k). Builds the tile unions with
    Triton where the kernels run (CUDA or the interpreter), else with PyTorch.
    """
    if idx.dim() != 3:
        raise ValueError(f"span_attention: idx must be [Nq, Hi, TOPK], got shape {tuple(idx.shape)}")
    idx = idx.to(torch.int32).contiguous()
    if check_unique and idx.shape[2] > 1:
        srt = idx.sort(-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
            raise ValueError("span_attention: idx lists a span twice for one (query, head); give each span once")
    union, count, full = (_tile_unions_triton if triton_usable(idx) else _tile_unions)(idx, block_m)
    return SpanPlan(idx=idx, span_offsets=span_offsets.to(torch.int32).contiguous(), block_m=block_m,
                    union=union, union_count=count, union_full=full, query_offsets=query_offsets)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (the definition; float64-checkable, differentiable)
# ----------------------------------------------------------------------------------------------
def span_attention_reference(q, k, v, idx, span_offsets, scale=None):
    """Reference of :func:`span_attention`: gathers each query's keys (padded), exact softmax.

    Memory O(Nq * Hkv * TOPK * max_span_len * D): meant for small inputs or a subset of queries.
    Returns (o [Nq, Hq, D], lse [Nq, Hq]).
    """
    nq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    idx = idx.long()
    hi = idx.shape[1]
    off = span_offsets.long()
    valid_span = idx >= 0
    safe = idx.clamp(min=0)
    start = off[safe]
    length = torch.where(valid_span, off[safe + 1] - start, 0)
    lmax = max(int(length.max().item()) if length.numel() else 0, 1)
    ar = torch.arange(lmax, device=q.device)
    pos = (start[..., None] + ar).clamp(max=max(k.shape[0] - 1, 0))  # [Nq, Hi, TOPK, L]
    valid = ar < length[..., None]
    pos = pos.flatten(2).expand(nq, hkv, -1) if hi == 1 else pos.flatten(2)
    valid = valid.flatten(2).expand(nq, hkv, -1) if hi == 1 else valid.flatten(2)
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    kg = k[pos, heads]  # [Nq, Hkv, K, D]
    vg = v[pos, heads]
    s = torch.einsum("nhgd,nhkd->nhgk", q.view(nq, hkv, g, d), kg) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.where(valid[:, :, None, :], p, 0.0)
    o = torch.einsum("nhgk,nhkd->nhgd", p, vg)
    return o.reshape(nq, hq, d), lse.reshape(nq, hq)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:
    from d3ds2.kernels.span_work import _work_item

    # a bounded forward's row sum below this (2^-64) means its bound exceeds the row's largest score by more
    # than 64 log2 units: scores 62 more below it would flush to zero in fp32, so the tile is redone
    BOUND_SUM_MIN = tl.constexpr(2.0 ** -64)

    @triton.jit
    def _sort_rows_minmax(x, TT: tl.constexpr, W: tl.constexpr, LOG_W: tl.constexpr):
        """x [TT, W] sorted ascending along dim 1: the bitonic network of tl.sort with each compare-exchange
        written as a min and a max over the pair axis (reductions the interpreter runs vectorised)."""
        p = tl.arange(0, W)[None, :]
        for stage in tl.static_range(1, LOG_W + 1):
            desc = ((p >> stage) & 1) == 1  # blocks of 2^stage alternate direction; the last is ascending
            for sub in tl.static_range(stage):
                D: tl.constexpr = 1 << (stage - 1 - sub)
                h = tl.reshape(x, (TT, W // (2 * D), 2, D))
                lo = tl.reshape(tl.broadcast_to(tl.min(h, axis=2, keep_dims=True), (TT, W // (2 * D), 2, D)), (TT, W))
                hi = tl.reshape(tl.broadcast_to(tl.max(h, axis=2, keep_dims=True), (TT, W // (2 * D), 2, D)), (TT, W))
                right = ((p >> (stage - 1 - sub)) & 1) == 1
                x = tl.where(right != desc, hi, lo)
        return x

    @triton.jit
    def _tile_unions_kernel(IDX, UNION, UCNT, UFULL, n_q, n_tiles, HI: tl.constexpr, TOPK: tl.constexpr,
                            BM: tl.constexpr, W_P: tl.constexpr, LOG_W: tl.constexpr, TT: tl.constexpr,
                            MINMAX_SORT: tl.constexpr):
        """Sorted unique span ids of TT tiles of BM queries of one head (see _tile_unions): each tile's
        BM*TOPK ids (padded to W_P with the largest int32) are sorted; an id starts a run where it differs
        from its left neighbour, its rank among the unique ids is the running count of run starts, and
        every query of the tile selected it iff the id nq - 1 places on is the same (a query lists an id
        at most once, so a run is at most nq long)."""
        h = tl.program_id(1)
        tile = tl.program_id(0) * TT + tl.arange(0, TT)
        W: tl.constexpr = BM * TOPK
        BIG: tl.constexpr = 2147483647
        j = tl.broadcast_to(tl.arange(0, W_P)[None, :], (TT, W_P))
        qi = tile[:, None] * BM + j // TOPK
        ok = (j < W) & (qi < n_q)
        x = tl.load(IDX + (qi * HI + h) * TOPK + j % TOPK, mask=ok, other=-1)
        x = tl.where(x < 0, BIG, x)
        if MINMAX_SORT:
            s = _sort_rows_minmax(x, TT, W_P, LOG_W)
        else:
            s = tl.sort(x, dim=1)
        prev = tl.gather(s, tl.maximum(j - 1, 0), axis=1)
        first = (s != BIG) & ((j == 0) | (s != prev))
        rank = tl.cumsum(first.to(tl.int32), axis=1) - 1
        count = tl.sum(first.to(tl.int32), axis=1)
        nq = tl.maximum(tl.minimum(n_q - tile * BM, BM), 1)  # queries of the tile (1 past the last tile)
        last = j + nq[:, None] - 1  # where a run of every query of the tile would end
        full = (last < W_P) & (tl.gather(s, tl.minimum(last, W_P - 1), axis=1) == s)
        in_grid = (tile < n_tiles)[:, None]
        row = (h * n_tiles + tile)[:, None] * W
        tl.store(UNION + row + rank, s, mask=first)
        tl.store(UFULL + row + rank, full.to(tl.int8), mask=first)
        pad = (j >= count[:, None]) & (j < W) & in_grid
        tl.store(UNION + row + j, tl.full((TT, W_P), -1, tl.int32), mask=pad)
        tl.store(UFULL + row + j, tl.zeros((TT, W_P), tl.int8), mask=pad)
        tl.store(UCNT + h * n_tiles + tile, count, mask=tile < n_tiles)

    @triton.jit
    def _query_rows(QIDX, qi, rmask, HAS_QIDX: tl.constexpr):
        """Row of each plan query in q/o/lse/dO/dQ: QIDX[qi] (a permutation of the rows) or qi itself."""
        if HAS_QIDX:
            return tl.load(QIDX + qi, mask=rmask, other=0)
        else:
            return qi

    @triton.jit
    def _tile_span(UNION, UFULL, SOFF, sel, slot):
        """Span number `slot` of a tile's union list: which rows selected it (row_sel [R]), whether all of
        them did (all_rows), and its key range [k_lo, k_hi)."""
        span = tl.load(UNION + slot)
        row_sel = tl.sum((sel == span).to(tl.int32), axis=1) > 0
        all_rows = tl.load(UFULL + slot)
        return row_sel, all_rows, tl.load(SOFF + span), tl.load(SOFF + span + 1)

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
        r = tl.arange(0, R)
        qi = tile * BM + r // G
        hq = kvh * G + r % G
        rmask = qi < n_q
        qrow = _query_rows(QIDX, qi, rmask, HAS_QIDX)
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
        r = tl.arange(0, R)
        qi = tile * BM + r // G
        hq = kvh * G + r % G
        rmask = qi < n_q
        qrow = _query_rows(QIDX, qi, rmask, HAS_QIDX)
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

    @triton.jit
    def _gated_sum_kernel(A, B, C, GA, GB, GC, OUT, n_rows, W: tl.constexpr, BR: tl.constexpr):
        """OUT[n] = GA[n] * A[n] + GB[n] * B[n] + GC[n] * C[n] over rows of W elements (fp32 math)."""
        n = tl.program_id(0) * BR + tl.arange(0, BR)
        nm = n < n_rows
        w = tl.arange(0, W)
        off = n[:, None] * W + w[None, :]
        m = nm[:, None]
        ga = tl.load(GA + n, mask=nm, other=0.0).to(tl.float32)[:, None]
        gb = tl.load(GB + n, mask=nm, other=0.0).to(tl.float32)[:, None]
        gc = tl.load(GC + n, mask=nm, other=0.0).to(tl.float32)[:, None]
        out = ga * tl.load(A + off, mask=m, other=0.0).to(tl.float32)
        out += gb * tl.load(B + off, mask=m, other=0.0).to(tl.float32)
        out += gc * tl.load(C + off, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
def _num_warps(rows: int, d: int) -> int:
    return 8 if rows * d >= 128 * 64 else 4


SPAN_STAGES = 3  # software-pipeline depth of the kernel loops (H200, d 32: fwd 5.05 -> 4.77 ms, dQ 5.50 -> 5.17)


def _check(q, k, v, plan):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"span_attention: {name} must be [N, heads, head_dim], got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"span_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"span_attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    d = q.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"span_attention: head_dim must be a power of two >= 16, got {d}")
    if plan.idx.shape[0] != q.shape[0] or plan.idx.shape[1] not in (1, k.shape[1]):
        raise ValueError(f"span_attention: idx {tuple(plan.idx.shape)} does not match q {tuple(q.shape)}")
    if max(q.numel(), k.numel()) >= 2 ** 31:
        raise ValueError("span_attention: tensors over 2^31 elements are not supported (int32 offsets)")


BOUNDED_FORWARD = True  # the forward without a running max (MODE 1 of the kernel); False: online softmax
# ... where the spans hold at least this many keys on average: on shorter spans (SSA's selection blocks and
# windows) the per-row bound and the extra launches cost more than the loop saves (H200: SSA v1.1 forward
# 1.56 ms bounded against 1.37 online at 3 x 10,655 tokens; full attention 4.41 against 4.91)
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
    written in q's row order. ``bounded`` (default: ``BOUNDED_FORWARD`` where the spans average at least
    ``BOUNDED_MIN_KEYS`` keys): offset each row's scores by a Cauchy-Schwarz bound on them instead of a
    running max (fewer instructions per score), then redo the tiles whose bound was too loose with the
    running max (a second launch; its programs exit at once on the other tiles). Not for fp16: p = exp2(c s
    - b) <= 1 is rounded to q's dtype for P @ V, and fp16's 5-bit exponent would flush what bf16 and fp32 keep.
    """
    o = torch.empty_like(q)
    lse2 = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
    if bounded is None:
        bounded = BOUNDED_FORWARD and k.shape[0] >= BOUNDED_MIN_KEYS * max(1, plan.n_spans)
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


HOPPER_DKDV = True  # the Gluon dK/dV kernel where it can run (sm_90, 16-bit); False: the Triton kernel (A/B timing)
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
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


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
    if HOPPER_DKDV and hopper_dkdv_usable(q, block_q * g, block_kv):
        span_dkdv_hopper(grid, args, shape)
    else:
        _span_bwd_dkdv_kernel[grid](*args, **shape, num_warps=_num_warps(block_q * g, d), num_stages=SPAN_STAGES)
    return dq, dk, dv, delta


def gated_sum(gates: torch.Tensor, *branches: torch.Tensor) -> torch.Tensor:
    """sum_i gates[:, i] * branches[i] for three branches [N, H, D] and gates [N, 3] (fp32 math, one pass;
    no autograd)."""
    a, b, c = (t.contiguous() for t in branches)
    n = a.shape[0]
    w = a[0].numel()
    out = torch.empty_like(a)
    if n == 0:
        return out
    g = gates.contiguous()
    br = max(1, 4096 // w)
    _gated_sum_kernel[(triton.cdiv(n, br),)](a, b, c, g[:, 0].contiguous(), g[:, 1].contiguous(),
                                             g[:, 2].contiguous(), out, n, W=w, BR=br, num_warps=4)
    return out


class _SpanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, block_k, block_q, block_kv, q_index):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse2 = span_forward(q, k, v, plan, scale, block_k, q_index)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.plan, ctx.scale, ctx.blocks, ctx.q_index = plan, scale, (block_k, block_q, block_kv), q_index
        lse = lse2 * LN2
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv, _ = span_backward(do, q, k, v, o, lse2, ctx.plan, ctx.scale, *ctx.blocks, q_index=ctx.q_index)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def default_block_m(group: int, topk: int) -> int:
    """Queries per forward tile: 64 rows (q heads x queries); fastest on an H200 for d 32 (docs/ssa.md)."""
    return max(1, 64 // group)


def span_attention(q, k, v, plan: SpanPlan, scale: float | None = None, *, backend: str = "auto",
                   block_k: int = 64, block_q: int | None = None, block_kv: int = 64,
                   q_index: torch.Tensor | None = None):
    """Attention of each query to the keys of its selected spans. Returns (o [Nq,Hq,D], lse [Nq,Hq]).

    backend: 'triton' (CUDA or TRITON_INTERPRET=1), 'torch' (the reference), 'auto' (triton if usable).
    Gradients flow to q, k, v (not through lse). Tiles: block_k keys per step of the forward and dQ
    kernels; the dK/dV kernel takes block_kv keys x block_q queries (default 128 rows = queries x heads).
    ``q_index`` [Nq] (a permutation): plan row i is q row q_index[i] (o and lse stay in q's row order);
    it lets a plan built over regrouped queries (e.g. shifted windows) run without copying q.
    """
    _check(q, k, v, plan)
    if q_index is not None and (q_index.dim() != 1 or q_index.numel() != q.shape[0]):
        raise ValueError(f"span_attention: q_index must be a permutation of the {q.shape[0]} rows of q, "
                         f"got shape {tuple(q_index.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if triton_usable(q) else "torch"
    if backend == "torch":
        if q_index is None:
            return span_attention_reference(q, k, v, plan.idx, plan.span_offsets, scale)
        qi = q_index.long()
        o, lse = span_attention_reference(q[qi], k, v, plan.idx, plan.span_offsets, scale)
        inverse = torch.empty_like(qi)
        inverse[qi] = torch.arange(qi.numel(), device=qi.device)
        return o[inverse], lse[inverse]
    if backend != "triton":
        raise ValueError(f"span_attention: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not triton_usable(q):
        raise RuntimeError("span_attention: the triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    _check_block_kv(q, block_kv)  # before the forward's work, not only in the backward
    g = q.shape[1] // k.shape[1]
    block_q = block_q or max(1, 128 // g)
    q_index = None if q_index is None else q_index.to(torch.int32).contiguous()
    return _SpanAttention.apply(q, k, v, plan, scale, block_k, block_q, block_kv, q_index)
