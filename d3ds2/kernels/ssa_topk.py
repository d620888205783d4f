"""SSA block scoring fused with top-k: no dense [Hkv, N, N_blocks] score tensor is ever materialised.

Definitions (per sample; Hq = G * Hkv):
- p[i, h, c] = softmax_c(scale * q[i, h] . k_cmp[c, h // G]) over the compressed tokens c of i's sample
  (recomputed from the log-sum-exp of the compressed attention: p = exp(s - lse));
- score[i, kvh, b] = sum over the G q heads of KV head kvh, and over the compressed tokens c inside
  selection block b, of p[i, h, c];
- idx[i, kvh] = the top-k selection blocks of i's sample by score (k = min(topk, #blocks); -1 pads).

Kernel: one program per (tile of BM queries x G heads, KV head). It walks the
selection blocks of its queries' samples in *chunks*: runs of whole selection blocks whose compressed
tokens (contiguous in the layout) fill at most BC slots, so no slot is spent on an empty compression
sub-block. Per chunk, scores are computed transposed, s^T = k_cmp[chunk] @ q^T ([BC, BM*G]), so that
the two sums are tensor-core products instead of register shuffles: p^T @ S sums the G heads of each
query (S [BM*G, BM] is the 0/1 head-to-query matrix) and, when a selection block holds several
compressed tokens (m_cmp < m_slc), a 0/1 token-to-block matrix sums the tokens of each block. The block
scores are merged into a running top-k held in registers (insertion rounds that stop once no
candidate beats the kept minimum). Extra memory: the outputs, O(N * Hkv * topk), and the chunk table.

The shared variant (one top-k per query block, e.g. per m_cmp^3 block) sums the scores of the queries
of a block before the top-k: one program per (query block, KV head); it walks the selection blocks
through a slot table [M, RS] of compressed-token indices (RS = (m_slc / m_cmp)^3, -1 for empty
sub-blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .runtime import auto_triton, interpreting, triton
from .span_common import LOG2E

if triton is not None:
    import triton.language as tl


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def block_scores_reference(q, k_cmp, lse, sample_of_query, sample_block_offsets, block_of_cmp, scale=None):
    """Dense block scores [Nq, Hkv, M] (dtype of q; -1 for blocks of other samples).

    q [Nq, Hq, D]; k_cmp [Nc, Hkv, D]; lse [Nq, Hq] natural log of the compressed attention;
    sample_of_query [Nq]; sample_block_offsets [B+1]; block_of_cmp [Nc] selection block of each
    compressed token.
    """
    nq, hq, d = q.shape
    hkv = k_cmp.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    m = int(sample_block_offsets[-1])
    s = torch.einsum("nhgd,chd->nhgc", q.view(nq, hkv, g, d), k_cmp) * scale
    p = torch.exp(s - lse.view(nq, hkv, g, 1)).sum(2)  # [Nq, Hkv, Nc]
    score = torch.zeros(nq, hkv, m, dtype=p.dtype, device=p.device).index_add_(2, block_of_cmp.long(), p)
    blk_sample = torch.repeat_interleave(torch.arange(len(sample_block_offsets) - 1, device=q.device),
                                         (sample_block_offsets[1:] - sample_block_offsets[:-1]).long())
    own = blk_sample[None, :] == sample_of_query.long()[:, None]  # [Nq, M]
    return torch.where(own[:, None, :], score, torch.full_like(score, -1.0))


def topk_reference(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of dense scores [..., M] (negative = not selectable): (idx int32 [..., topk] with -1, values)."""
    k = min(topk, scores.shape[-1])
    val, ind = scores.topk(k, dim=-1)
    ind = torch.where(val >= 0, ind, -1)
    if k < topk:
        pad = list(scores.shape[:-1]) + [topk - k]
        ind = torch.cat([ind, ind.new_full(pad, -1)], -1)
        val = torch.cat([val, val.new_full(pad, -1.0)], -1)
    return ind.to(torch.int32), val


@dataclass(frozen=True)
class ScoreChunks:
    """Runs of whole selection blocks of one sample whose compressed tokens fill at most ``width`` slots.

    sample_chunk_offsets [B+1] int32: chunks of sample s are sample_chunk_offsets[s]:[s+1];
    chunk_cmp [C+1] int32: compressed tokens of chunk j are chunk_cmp[j]:chunk_cmp[j+1];
    chunk_block [C+1] int32: selection blocks of chunk j are chunk_block[j]:chunk_block[j+1].
    """

    width: int
    sample_chunk_offsets: torch.Tensor
    chunk_cmp: torch.Tensor
    chunk_block: torch.Tensor


def score_chunks(block_of_cmp: torch.Tensor, sample_block_offsets: torch.Tensor, per_block: int,
                 width: int = 64) -> ScoreChunks:
    """Chunks for :func:`score_topk` when a selection block holds up to ``per_block`` compressed tokens.

    block_of_cmp [Nc] (non-decreasing: the compressed tokens of a block are contiguous); blocks are
    grouped by which window of ``width - per_block + 1`` compressed tokens (counted from the sample's
    first) their first token falls in, so a chunk never spans more than ``width`` tokens.
    """
    if width < 16 or width & (width - 1):
        raise ValueError(f"score_chunks: width must be a power of two >= 16 (the kernel's tile), got {width}")
    if per_block > width:
        raise ValueError(f"score_chunks: a block of {per_block} compressed tokens does not fit {width} slots")
    dev = block_of_cmp.device
    m = int(sample_block_offsets[-1])
    counts = torch.bincount(block_of_cmp.long(), minlength=m)
    first = torch.zeros(m + 1, dtype=torch.int64, device=dev)
    first[1:] = counts.cumsum(0)
    sbo = sample_block_offsets.long()
    sample_of_block = torch.repeat_interleave(torch.arange(sbo.numel() - 1, device=dev), sbo[1:] - sbo[:-1])
    sample_first = first[sbo[:-1]]
    window = (first[:-1] - sample_first[sample_of_block]) // (width - per_block + 1)
    key = sample_of_block * (first[-1] + 1) + window
    _, block_counts = torch.unique_consecutive(key, return_counts=True)
    chunk_block = torch.zeros(block_counts.numel() + 1, dtype=torch.int64, device=dev)
    chunk_block[1:] = block_counts.cumsum(0)
    sample_of_chunk = sample_of_block[chunk_block[:-1]]
    per_sample = torch.bincount(sample_of_chunk, minlength=sbo.numel() - 1)
    sample_chunk_offsets = torch.zeros(sbo.numel(), dtype=torch.int64, device=dev)
    sample_chunk_offsets[1:] = per_sample.cumsum(0)
    i32 = lambda t: t.to(torch.int32).contiguous()
    return ScoreChunks(width, i32(sample_chunk_offsets), i32(first[chunk_block]), i32(chunk_block))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _merge_topk(cand, blk0, run_val, run_idx, TOPK_P: tl.constexpr, BS: tl.constexpr):
        """Merge candidates cand [R, BS] (ids blk0 + column; < 0 = invalid) into the running top-k.

        Each round inserts, in every row, its best remaining candidate in place of the row's smallest
        kept value; rounds stop as soon as no row has a candidate above its smallest kept value, so a
        tile costs 1 + (most insertions in one row) rounds (few once the top-k has settled).
        """
        cols = tl.arange(0, TOPK_P)
        ccols = tl.arange(0, BS)
        # cheap test first (plain max/min): most tiles of a settled top-k insert nothing
        if tl.max(((tl.max(cand, 1) > tl.min(run_val, 1)) & (tl.max(cand, 1) >= 0)).to(tl.int32), 0) > 0:
            cmax, carg = tl.max(cand, 1, return_indices=True, return_indices_tie_break_left=True)
            rmin, rarg = tl.min(run_val, 1, return_indices=True, return_indices_tie_break_left=True)
            take = (cmax > rmin) & (cmax >= 0)
            while tl.max(take.to(tl.int32), 0) > 0:
                hit = take[:, None] & (cols[None, :] == rarg[:, None])
                run_val = tl.where(hit, cmax[:, None], run_val)
                run_idx = tl.where(hit, (blk0 + carg)[:, None], run_idx)
                cand = tl.where(take[:, None] & (ccols[None, :] == carg[:, None]), -1.0, cand)
                cmax, carg = tl.max(cand, 1, return_indices=True, return_indices_tie_break_left=True)
                rmin, rarg = tl.min(run_val, 1, return_indices=True, return_indices_tie_break_left=True)
                take = (cmax > rmin) & (cmax >= 0)
        return run_val, run_idx

    @triton.jit
    def _score_topk_kernel(Q, KC, LSE, SAMPLE, SBOFF, SCHOFF, CH_CMP, CH_BLK, BLK_OF_CMP, OUT_IDX, OUT_VAL,
                                n_q, sm_scale_log2, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                                D: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr, CHUNKED: tl.constexpr,
                                BM: tl.constexpr, BC: tl.constexpr, PDT: tl.constexpr):
        """Scores computed transposed ([BC compressed tokens, BM*G rows]); head and sub-block sums as dots.

        CHUNKED: chunks from the chunk table (SCHOFF, CH_CMP, CH_BLK; blocks of several compressed tokens).
        Otherwise one compressed token per selection block (block id == token id) and a chunk is BC
        consecutive blocks of the tile's samples.
        """
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        R: tl.constexpr = BM * G
        r = tl.arange(0, R)
        qi = tile * BM + r // G
        hq = kvh * G + r % G
        rmask = qi < n_q
        d = tl.arange(0, D)
        q = tl.load(Q + (qi[:, None] * HQ + hq[:, None]) * D + d[None, :], mask=rmask[:, None], other=0.0)
        qt = tl.trans(q)
        lse2 = tl.load(LSE + qi * HQ + hq, mask=rmask, other=0.0)
        qcol = tl.arange(0, BM)
        head_sum = ((r[:, None] // G) == qcol[None, :]).to(PDT)  # [R, BM]: row (query, head) -> query
        qb = tile * BM + qcol
        qbm = qb < n_q
        smp = tl.load(SAMPLE + qb, mask=qbm, other=0)
        b_lo = tl.where(qbm, tl.load(SBOFF + smp, mask=qbm, other=0), 2147483647)
        b_hi = tl.where(qbm, tl.load(SBOFF + smp + 1, mask=qbm, other=0), 0)
        if CHUNKED:
            lo = tl.min(tl.where(qbm, tl.load(SCHOFF + smp, mask=qbm, other=0), 2147483647), 0)
            hi = tl.max(tl.where(qbm, tl.load(SCHOFF + smp + 1, mask=qbm, other=0), 0), 0)
            n_t = hi - lo
        else:
            lo = tl.min(b_lo, 0)
            hi = tl.max(b_hi, 0)
            n_t = tl.cdiv(hi - lo, BC)
        cols = tl.arange(0, TOPK_P)
        ccols = tl.arange(0, BC)
        run_val = tl.where(cols[None, :] < TOPK, tl.full([BM, TOPK_P], -2.0, tl.float32), float("inf"))
        run_idx = tl.full([BM, TOPK_P], -1, tl.int32)
        # chunks visited in a strided order: block scores vary smoothly in space, so a sorted sweep keeps
        # inserting into the running top-k; a scrambled order lets it settle after a few chunks
        stride = tl.where(n_t % 97 == 0, 1, 97)
        for t in range(0, n_t):
            tt = (t * stride) % n_t
            if CHUNKED:
                c0 = tl.load(CH_CMP + lo + tt)
                c1 = tl.load(CH_CMP + lo + tt + 1)
                blk0 = tl.load(CH_BLK + lo + tt)
                b_end = tl.load(CH_BLK + lo + tt + 1)
            else:
                c0 = lo + tt * BC
                c1 = hi
                blk0 = c0
                b_end = hi
            cn = c0 + ccols
            cm = cn < c1
            k = tl.load(KC + (cn[:, None] * HKV + kvh) * D + d[None, :], mask=cm[:, None], other=0.0)
            pt = tl.math.exp2(tl.dot(k, qt) * sm_scale_log2 - lse2[None, :])  # [BC, R]
            pq = tl.dot(pt.to(PDT), head_sum)  # [BC, BM]: summed over each query's G heads
            if CHUNKED:
                j = tl.where(cm, tl.load(BLK_OF_CMP + cn, mask=cm, other=0) - blk0, -1)
                token_to_block = (ccols[:, None] == j[None, :]).to(PDT)  # [BC blocks, BC tokens]
                pb = tl.trans(tl.dot(token_to_block, pq.to(PDT)))  # [BM, BC blocks]
            else:
                pb = tl.trans(pq)
            blk = blk0 + ccols
            own = (blk[None, :] >= b_lo[:, None]) & (blk[None, :] < b_hi[:, None]) & (blk[None, :] < b_end)
            run_val, run_idx = _merge_topk(tl.where(own, pb, -1.0), blk0, run_val, run_idx, TOPK_P, BC)
        out = (qb[:, None] * HKV + kvh) * TOPK + cols[None, :]
        omask = qbm[:, None] & (cols[None, :] < TOPK)
        tl.store(OUT_IDX + out, run_idx, mask=omask)
        tl.store(OUT_VAL + out, tl.where(run_idx >= 0, run_val, -1.0), mask=omask)

    @triton.jit
    def _shared_score_topk_kernel(Q, KC, LSE, QOFF, SAMPLE_OF_QB, SBOFF, SLOTS, OUT_IDX, OUT_VAL,
                                  sm_scale_log2, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                                  D: tl.constexpr, TOPK: tl.constexpr, TOPK_P: tl.constexpr,
                                  RS: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr):
        qblk = tl.program_id(0)
        kvh = tl.program_id(1)
        q_lo = tl.load(QOFF + qblk)
        q_hi = tl.load(QOFF + qblk + 1)
        smp = tl.load(SAMPLE_OF_QB + qblk)
        lo = tl.load(SBOFF + smp)
        hi = tl.load(SBOFF + smp + 1)
        R: tl.constexpr = BM * G
        r = tl.arange(0, R)
        hq = kvh * G + r % G
        d = tl.arange(0, D)
        cols = tl.arange(0, TOPK_P)
        run_val = tl.where(cols[None, :] < TOPK, tl.full([1, TOPK_P], -2.0, tl.float32), float("inf"))
        run_idx = tl.full([1, TOPK_P], -1, tl.int32)
        SL: tl.constexpr = BS * RS
        for b0 in range(lo, hi, BS):
            sl = b0 * RS + tl.arange(0, SL)
            ci = tl.load(SLOTS + sl, mask=sl < hi * RS, other=-1)
            kt = tl.load(KC + (ci[None, :] * HKV + kvh) * D + d[:, None], mask=ci[None, :] >= 0, other=0.0)
            acc = tl.zeros([SL], tl.float32)
            for q0 in range(q_lo, q_hi, BM):
                qi = q0 + r // G
                rmask = qi < q_hi
                q = tl.load(Q + (qi[:, None] * HQ + hq[:, None]) * D + d[None, :], mask=rmask[:, None],
                            other=0.0)
                lse2 = tl.load(LSE + qi * HQ + hq, mask=rmask, other=0.0)
                s = tl.dot(q, kt) * sm_scale_log2
                p = tl.where(rmask[:, None] & (ci[None, :] >= 0), tl.math.exp2(s - lse2[:, None]), 0.0)
                acc += tl.sum(p, 0)
            if RS > 1:
                pb = tl.sum(tl.reshape(acc, [BS, RS]), axis=1)
            else:
                pb = acc
            blk = b0 + tl.arange(0, BS)
            cand = tl.where(blk < hi, pb, -1.0)[None, :]
            run_val, run_idx = _merge_topk(cand, b0, run_val, run_idx, TOPK_P, BS)
        out = (qblk * HKV + kvh) * TOPK + cols[None, :]
        omask = cols[None, :] < TOPK
        tl.store(OUT_IDX + out, run_idx, mask=omask)
        tl.store(OUT_VAL + out, tl.where(run_idx >= 0, run_val, -1.0), mask=omask)


SCORE_ROWS = 128  # rows (queries x q heads) per score_topk program by default
SCORE_WARPS = 4  # warps per score_topk program by default


def _block_s(rs: int) -> int:
    return max(16, 64 // rs)


def score_topk(q, k_cmp, lse, sample_of_query, sample_block_offsets, block_of_cmp, topk: int,
               scale: float | None = None, *, chunks: ScoreChunks | None = None, backend: str = "auto",
               block_m: int | None = None, num_warps: int | None = None):
    """Top-k selection blocks per (query, KV head): (idx int32 [Nq, Hkv, topk] (-1 pads), scores fp32).

    See the module docstring for the definition. block_of_cmp [Nc] selection block of each compressed
    token (non-decreasing). ``chunks`` (:func:`score_chunks`) is required when a selection block holds
    several compressed tokens (m_cmp < m_slc); None means one token per block (block id == token id).
    ``block_m``: queries per program (default SCORE_ROWS rows of queries x heads); ``num_warps``: warps per
    program (default SCORE_WARPS).
    Indices are global selection-block ids (into sample_block_offsets' numbering), unsorted.
    """
    nq, hq, d = q.shape
    hkv = k_cmp.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if auto_triton(q, "SSA block scoring") else "torch"
    if backend == "torch":
        return topk_reference(block_scores_reference(q, k_cmp, lse, sample_of_query, sample_block_offsets,
                                                     block_of_cmp, scale), topk)
    g = hq // hkv
    bm = block_m or max(1, SCORE_ROWS // g)
    out_idx = torch.empty((nq, hkv, topk), device=q.device, dtype=torch.int32)
    out_val = torch.empty((nq, hkv, topk), device=q.device, dtype=torch.float32)
    lse2 = (lse.float() * LOG2E).contiguous()
    i32 = lambda t: t.to(torch.int32).contiguous()
    if chunks is None:  # the chunk-table arguments are unused
        ch = (sample_block_offsets, sample_block_offsets, sample_block_offsets)
    else:
        ch = (chunks.sample_chunk_offsets, chunks.chunk_cmp, chunks.chunk_block)
    width = 64 if chunks is None else chunks.width
    _score_topk_kernel[(triton.cdiv(nq, bm), hkv)](
        q.contiguous(), k_cmp.contiguous(), lse2, i32(sample_of_query), i32(sample_block_offsets),
        *(i32(t) for t in ch), i32(block_of_cmp), out_idx, out_val, nq, scale * LOG2E, HQ=hq, HKV=hkv, G=g,
        D=d, TOPK=topk, TOPK_P=triton.next_power_of_2(topk), CHUNKED=chunks is not None, BM=bm, BC=width,
        PDT=tl.float32 if interpreting() else tl.float16, num_warps=num_warps or SCORE_WARPS, num_stages=2)
    return out_idx, out_val


def shared_score_topk(q, k_cmp, lse, query_block_offsets, sample_of_query_block, sample_block_offsets,
                      slots, block_of_cmp, topk: int, scale: float | None = None, *, backend: str = "auto"):
    """Top-k per (query block, KV head) of the block scores summed over the block's queries.

    query_block_offsets [Q+1]: queries of query block j are query_block_offsets[j]:[j+1] (contiguous);
    sample_of_query_block [Q]; slots [M, RS] compressed token of each sub-block of a selection block
    (-1: empty); block_of_cmp [Nc]. Returns (idx int32 [Q, Hkv, topk], scores fp32 [Q, Hkv, topk]).
    """
    nq, hq, d = q.shape
    hkv = k_cmp.shape[1]
    nqb = query_block_offsets.numel() - 1
    scale = d ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if auto_triton(q, "SSA block scoring") else "torch"
    qoff = query_block_offsets.long()
    if backend == "torch":
        sample_of_query = torch.repeat_interleave(sample_of_query_block.long(), qoff[1:] - qoff[:-1])
        sc = block_scores_reference(q, k_cmp, lse, sample_of_query, sample_block_offsets, block_of_cmp, scale)
        csum = torch.zeros((nq + 1,) + sc.shape[1:], dtype=sc.dtype, device=sc.device)
        csum[1:] = sc.cumsum(0)
        summed = csum[qoff[1:]] - csum[qoff[:-1]]
        own = sc[qoff[:-1]] >= 0  # blocks of the query block's sample
        return topk_reference(torch.where(own, summed, -1.0), topk)
    g = hq // hkv
    rs = slots.shape[1]
    bm = max(1, 64 // g)
    out_idx = torch.empty((nqb, hkv, topk), device=q.device, dtype=torch.int32)
    out_val = torch.empty((nqb, hkv, topk), device=q.device, dtype=torch.float32)
    lse2 = (lse.float() * LOG2E).contiguous()
    bs = _block_s(rs)
    _shared_score_topk_kernel[(nqb, hkv)](
        q.contiguous(), k_cmp.contiguous(), lse2, query_block_offsets.to(torch.int32).contiguous(),
        sample_of_query_block.to(torch.int32).contiguous(), sample_block_offsets.to(torch.int32).contiguous(),
        slots.to(torch.int32).contiguous(), out_idx, out_val, scale * LOG2E, HQ=hq, HKV=hkv, G=g, D=d,
        TOPK=topk, TOPK_P=triton.next_power_of_2(topk), RS=rs, BM=bm, BS=bs, num_warps=4, num_stages=2)
    return out_idx, out_val
