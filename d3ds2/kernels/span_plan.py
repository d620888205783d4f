"""Span-attention plan: the index structures the kernels need besides q/k/v, built once per ``idx`` and reused
by the forward and backward (:func:`plan_spans`): each forward tile's sorted union of selected spans, the
CSR list of the queries that selected each span, and the dK/dV work plans cached on it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .runtime import interpreting, triton, triton_usable


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


def _tile_unions_triton(idx: torch.Tensor, block_m: int, minmax_sort: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_tile_unions` in one Triton pass (same outputs): several tiles per program, each tile's
    BM*TOPK ids sorted, deduplicated and compacted in registers. ``minmax_sort``: sort with the kernel's
    min/max bitonic network instead of ``tl.sort`` (whose pair exchanges the interpreter runs element by
    element in Python): the interpreter's sort only, its default there (None: on under the interpreter); it
    does not compile for a GPU (its loop reassigns a constexpr, which the compiler rejects)."""
    minmax_sort = interpreting() if minmax_sort is None else minmax_sort
    if minmax_sort and not interpreting():
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



def default_block_m(group: int, topk: int) -> int:
    """Queries per forward tile: 64 rows (q heads x queries); fastest on an H200 for d 32 (docs/ssa.md)."""
    return max(1, 64 // group)


if triton is not None:
    import triton.language as tl

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
