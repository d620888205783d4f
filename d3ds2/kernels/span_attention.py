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

Modules: :mod:`~d3ds2.kernels.span_plan` (the plan), :mod:`~d3ds2.kernels.span_reference` (the definition),
:mod:`~d3ds2.kernels.span_forward`, :mod:`~d3ds2.kernels.span_backward` (kernels and launches),
:mod:`~d3ds2.kernels.span_common` (what they share); this module holds the autograd function and the entry point.
"""
from __future__ import annotations

import torch

from .runtime import auto_triton, triton_usable
from .span_backward import _check_block_kv, span_backward
from .span_common import LN2
from .span_forward import span_forward
from .span_plan import SpanPlan
from .span_reference import span_attention_reference


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
        backend = "triton" if auto_triton(q, "span_attention") else "torch"
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
