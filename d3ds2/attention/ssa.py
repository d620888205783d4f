"""Spatial Sparse Attention (SSA, Direct3D-S2): compression, selection and window branches, gated.

Semantics (per sample of a variable-length batch; q [N, Hq, D], k/v [N, Hkv, D], Hq = G * Hkv):
1. compression: k' = k + intra_block_pe[coord % m_cmp]; k_cmp / v_cmp = compression modules applied to
   k' / v, one token per occupied m_cmp^3 block; o_cmp = attention of each query to the compressed
   tokens of its sample (log-sum-exp kept).
2. selection: block scores = compression softmax probabilities summed over the compressed tokens inside
   each m_slc^3 selection block and over the G q heads of a KV head; each (query, KV head) keeps its top-k
   blocks (k = min(topk, #blocks of the sample)); o_slc = attention to all tokens of those blocks.
   With ``shared_topk`` one top-k is taken per (m_cmp^3 query block, KV head) from the summed scores.
3. window: attention inside m_win^3 windows of the coords shifted by ``window_shift``.
Output = g0 * o_cmp + g1 * o_slc + g2 * o_win, gates [N, 3] = sigmoid(Linear(x)).

Tokens may come in any order: :func:`build_ssa_layout` sorts them once per forward (batch, selection
block, compression sub-block, position), and the layout is cached on the SparseTensor across layers.
The reference backend ('torch') is the definition; 'triton' runs the kernels of ``d3ds2/kernels/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3ds2.sparse import SparseGroupNorm, SparseTensor, SubMConv3d, pack_keys
from d3ds2.sparse.serialize import window_partition
from d3ds2.kernels.gated_sum import gated_sum
from d3ds2.kernels.runtime import auto_triton
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.span_backward import span_backward
from d3ds2.kernels.span_common import LN2
from d3ds2.kernels.span_forward import span_forward
from d3ds2.kernels.span_plan import SpanPlan, default_block_m, plan_spans
from d3ds2.kernels.ssa_topk import ScoreChunks, score_chunks, score_topk, shared_score_topk

_AXIS = 2 ** 14  # block coordinates per axis representable in the sort key


@dataclass(frozen=True)
class SSAConfig:
    """SSA hyper-parameters. Official v1.1: m_cmp = m_slc = 8, topk 8, compression 'v1';
    v1.0: m_cmp 4, m_slc 8, topk 32 (512) / 8 (1024), compression 'v2'."""

    m_cmp: int = 8
    m_slc: int = 8
    m_win: int = 8
    topk: int = 8
    window_shift: int = 0
    compression: str = "v1"
    shared_topk: bool = False
    backend: str = "auto"  # 'triton' | 'torch' | 'auto'

    def __post_init__(self):
        if self.m_slc % self.m_cmp:
            raise ValueError(f"SSAConfig: m_slc ({self.m_slc}) must be a multiple of m_cmp ({self.m_cmp})")
        if self.topk < 1:
            raise ValueError(f"SSAConfig: topk must be >= 1, got {self.topk}")
        if self.compression not in ("v1", "v2"):
            raise ValueError(f"SSAConfig: compression must be 'v1' or 'v2', got {self.compression!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"SSAConfig: backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")


@dataclass
class SSALayout:
    """Token order and block structure shared by all SSA layers of one forward.

    perm / inverse [N] int64: sorted = x[perm], x = sorted[inverse]. coords [N, 4] sorted.
    sample_token_offsets / sample_block_offsets / sample_cmp_offsets [B+1] int32;
    sample_of_token [N] int32. Selection blocks: block_offsets [M+1] int32, block_of_token [N] int32.
    Compression blocks (contiguous inside their selection block): cmp_offsets [Nc+1] int32,
    cmp_of_token [N] int64, cmp_counts [Nc], sample_of_cmp [Nc] int32, block_of_cmp [Nc] int32. slots [M, (m_slc/m_cmp)^3] int32:
    compressed token of each sub-block, -1 if empty. pe_index [N] int64: flat index of coord % m_cmp.
    """

    m_cmp: int
    m_slc: int
    perm: torch.Tensor
    inverse: torch.Tensor
    coords: torch.Tensor
    sample_token_offsets: torch.Tensor
    sample_of_token: torch.Tensor
    block_offsets: torch.Tensor
    block_of_token: torch.Tensor
    sample_block_offsets: torch.Tensor
    cmp_offsets: torch.Tensor
    cmp_of_token: torch.Tensor
    cmp_counts: torch.Tensor
    sample_cmp_offsets: torch.Tensor
    sample_of_cmp: torch.Tensor
    block_of_cmp: torch.Tensor
    slots: torch.Tensor
    pe_index: torch.Tensor
    cache: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    def compressed_plan(self, group: int) -> SpanPlan:
        """Plan of the compressed attention: each query attends to its sample's compressed tokens."""
        key = ("cmp", group)
        if key not in self.cache:
            self.cache[key] = plan_spans(self.sample_of_token.view(-1, 1, 1), self.sample_cmp_offsets,
                                         default_block_m(group, 1), query_offsets=self.sample_token_offsets)
        return self.cache[key]

    def block_window_plan(self, group: int) -> SpanPlan:
        """Plan of window attention when windows are the selection blocks (m_win == m_slc, no shift)."""
        key = ("win", group)
        if key not in self.cache:
            self.cache[key] = plan_spans(self.block_of_token.view(-1, 1, 1), self.block_offsets,
                                         default_block_m(group, 1), query_offsets=self.block_offsets)
        return self.cache[key]

    def score_chunks(self) -> ScoreChunks | None:
        """Chunk table of the block scoring when a selection block holds several compressed tokens
        (m_cmp < m_slc); None when m_cmp == m_slc (cached)."""
        if self.m_cmp == self.m_slc:
            return None
        if "score_chunks" not in self.cache:
            self.cache["score_chunks"] = score_chunks(self.block_of_cmp, self.sample_block_offsets,
                                                      (self.m_slc // self.m_cmp) ** 3)
        return self.cache["score_chunks"]

    @property
    def batch_size(self) -> int:
        return self.sample_token_offsets.numel() - 1

    def coarse(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compressed tokens as a canonical sparse grid: (perm [Nc], inverse [Nc], coords [Nc, 4] int32
        (batch, x // m_cmp, ...) sorted), canonical = compressed[perm] (cached)."""
        if "coarse" not in self.cache:
            c = self.coords[self.cmp_offsets[:-1].long()]
            c = torch.cat([c[:, :1], torch.div(c[:, 1:], self.m_cmp, rounding_mode="floor")], 1)
            perm = torch.argsort(pack_keys(c))
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            self.cache["coarse"] = (perm, inverse, c[perm].int().contiguous())
        return self.cache["coarse"]

    def window_plan(self, window: int, shift: int, group: int) -> tuple[SpanPlan, torch.Tensor | None]:
        """Plan of the window branch and the query order it runs in: (plan, q_index [N] int32 or None).

        When the windows are the selection blocks (window == m_slc, shift 0) the tokens are already
        grouped (q_index None); otherwise plan row i is token q_index[i] of the windows' grouping and the
        keys are k[q_index] (cached)."""
        if window == self.m_slc and shift == 0:
            return self.block_window_plan(group), None
        key = ("window", window, shift, group)
        if key not in self.cache:
            part = window_partition(self.coords, window, shift, self.sample_token_offsets.numel() - 1)
            plan = plan_spans(part.segment_of_token.view(-1, 1, 1), part.offsets, default_block_m(group, 1),
                              query_offsets=part.offsets)
            self.cache[key] = (plan, part.perm.to(torch.int32))
        return self.cache[key]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    out[1:] = counts.cumsum(0)
    return out


def build_ssa_layout(coords: torch.Tensor, m_cmp: int, m_slc: int, batch_size: int | None = None) -> SSALayout:
    """Sort voxels ``coords`` [N, 4] int (batch, x, y, z) for SSA; see :class:`SSALayout`.

    Order: batch, selection block (bx, by, bz), compression sub-block inside it, position inside that.
    ``batch_size`` defaults to max(batch) + 1 (give it when trailing samples may be empty).
    """
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"build_ssa_layout: coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
    if coords.shape[0] == 0:
        raise ValueError("build_ssa_layout: no tokens")
    if m_slc % m_cmp:
        raise ValueError(f"build_ssa_layout: m_slc ({m_slc}) must be a multiple of m_cmp ({m_cmp})")
    dev = coords.device
    c = coords.long()
    b, xyz = c[:, 0], c[:, 1:]
    if bool((c < 0).any()) or bool((xyz // m_slc >= _AXIS).any()):
        raise ValueError(f"build_ssa_layout: coords must be >= 0 and < {_AXIS * m_slc}")
    r = m_slc // m_cmp
    sb = xyz // m_slc
    sub = (xyz % m_slc) // m_cmp
    pos = xyz % m_cmp
    key_blk = ((b * _AXIS + sb[:, 0]) * _AXIS + sb[:, 1]) * _AXIS + sb[:, 2]
    sub_flat = (sub[:, 0] * r + sub[:, 1]) * r + sub[:, 2]
    pos_flat = (pos[:, 0] * m_cmp + pos[:, 1]) * m_cmp + pos[:, 2]
    perm = torch.argsort(sub_flat * m_cmp ** 3 + pos_flat, stable=True)
    perm = perm[torch.argsort(key_blk[perm], stable=True)]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=dev)
    kb, sf, bs = key_blk[perm], sub_flat[perm], b[perm]
    _, block_of_token, block_counts = torch.unique_consecutive(kb, return_inverse=True, return_counts=True)
    _, cmp_of_token, cmp_counts = torch.unique_consecutive(kb * r ** 3 + sf, return_inverse=True,
                                                           return_counts=True)
    n_batch = int(bs[-1].item()) + 1 if batch_size is None else batch_size
    block_offsets = _offsets(block_counts)
    cmp_offsets = _offsets(cmp_counts)
    first_of_block = block_offsets[:-1].long()
    first_of_cmp = cmp_offsets[:-1].long()
    sample_of_token = bs.to(torch.int32)
    sample_of_cmp = bs[first_of_cmp].to(torch.int32)
    slots = torch.full((block_counts.numel(), r ** 3), -1, dtype=torch.int32, device=dev)
    slots[block_of_token[first_of_cmp], sf[first_of_cmp]] = torch.arange(cmp_counts.numel(), device=dev,
                                                                         dtype=torch.int32)
    return SSALayout(
        m_cmp=m_cmp, m_slc=m_slc, perm=perm, inverse=inverse, coords=coords[perm],
        sample_token_offsets=_offsets(torch.bincount(bs, minlength=n_batch)),
        sample_of_token=sample_of_token,
        block_offsets=block_offsets, block_of_token=block_of_token.to(torch.int32),
        sample_block_offsets=_offsets(torch.bincount(bs[first_of_block], minlength=n_batch)),
        cmp_offsets=cmp_offsets, cmp_of_token=cmp_of_token, cmp_counts=cmp_counts,
        sample_cmp_offsets=_offsets(torch.bincount(bs[first_of_cmp], minlength=n_batch)),
        sample_of_cmp=sample_of_cmp, block_of_cmp=block_of_token[first_of_cmp].to(torch.int32), slots=slots, pe_index=pos_flat[perm])


# ----------------------------------------------------------------------------------------------
# Compression modules: [N, C] sorted token features -> [Nc, C], one token per m_cmp^3 block
# ----------------------------------------------------------------------------------------------
def block_mean(x: torch.Tensor, layout: SSALayout) -> torch.Tensor:
    """Mean of x [N, C] (sorted order) over each compression block -> [Nc, C] (at least fp32 accumulation)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(layout.cmp_counts.numel(), x.shape[1], device=x.device, dtype=acc)
    out.index_add_(0, layout.cmp_of_token, x.to(acc))
    return (out / layout.cmp_counts[:, None].to(acc)).to(x.dtype)


class CompressionV1(nn.Module):
    """Official v1 (SparseDownBlock3d_v1): 1x1 conv (a Linear with bias) -> SiLU -> mean over each block."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, layout: SSALayout) -> torch.Tensor:
        return block_mean(F.silu(self.proj(x)), layout)


class CompressionV2(nn.Module):
    """Official v2: GroupNorm -> SiLU -> mean over each block -> conv3^3 -> GroupNorm -> SiLU -> conv3^3 on the
    coarse grid of compressed tokens, plus the block mean of the input (skip). Official names:
    norm1 = act_layers.0, conv1 = out_layers.0.conv, norm2 = out_layers.1, conv2 = out_layers.3.conv."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = SparseGroupNorm(groups, channels)
        self.conv1 = SubMConv3d(channels, channels, 3)
        self.norm2 = SparseGroupNorm(groups, channels)
        self.conv2 = SubMConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor, layout: SSALayout) -> torch.Tensor:
        fine = SparseTensor(x, layout.coords, layout.batch_size, check=False)
        h = block_mean(F.silu(self.norm1(fine).feats), layout)
        perm, inverse, coords = layout.coarse()
        coarse = SparseTensor(h[perm], coords, layout.batch_size, check=False, cache=layout.cache.setdefault(
            "coarse_cache", {}))
        h = self.conv1(coarse)
        h = self.conv2(h.replace(F.silu(self.norm2(h).feats)))
        return block_mean(x, layout) + h.feats[inverse]


# ----------------------------------------------------------------------------------------------
# Functional SSA (inputs in layout order)
# ----------------------------------------------------------------------------------------------
def compressed_attention(q, k_cmp, v_cmp, layout: SSALayout, backend: str = "auto"):
    """Attention of each query to its sample's compressed tokens: (o [N, Hq, D], lse [N, Hq])."""
    return span_attention(q, k_cmp, v_cmp, layout.compressed_plan(q.shape[1] // k_cmp.shape[1]),
                          backend=backend)


@torch.no_grad()
def select_blocks(q, k_cmp, lse, layout: SSALayout, topk: int, shared: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """Top-k selection blocks per (query, KV head): idx int32 [N, Hkv, topk] (global block ids, -1 pads)."""
    if shared:
        idx, _ = shared_score_topk(q, k_cmp, lse, layout.cmp_offsets, layout.sample_of_cmp,
                                   layout.sample_block_offsets, layout.slots, layout.block_of_cmp, topk,
                                   backend=backend)
        return idx[layout.cmp_of_token]
    idx, _ = score_topk(q, k_cmp, lse, layout.sample_of_token, layout.sample_block_offsets, layout.block_of_cmp,
                        topk, chunks=layout.score_chunks(), backend=backend)
    return idx


SELECTION_BLOCK_K = 32  # keys per step of the selection and window kernels (blocks of ~70 tokens)


def selection_plan(idx, layout: SSALayout, group: int) -> SpanPlan:
    """Plan of the selection branch for the chosen blocks idx [N, Hkv, topk] (a top-k: unique ids, so the
    plan skips the duplicate check and its host sync)."""
    return plan_spans(idx, layout.block_offsets, default_block_m(group, idx.shape[-1]), check_unique=False)


def selection_attention(q, k, v, idx, layout: SSALayout, backend: str = "auto"):
    """Attention of each (query, KV head) to all tokens of its selected blocks -> o [N, Hq, D]."""
    plan = selection_plan(idx, layout, q.shape[1] // k.shape[1])
    return span_attention(q, k, v, plan, backend=backend, block_k=SELECTION_BLOCK_K)[0]


def ssa_window_attention(q, k, v, layout: SSALayout, window: int, shift: int, backend: str = "auto"):
    """Window branch -> o [N, Hq, D]; runs over the windows' grouping of the tokens without copying q."""
    plan, q_index = layout.window_plan(window, shift, q.shape[1] // k.shape[1])
    if q_index is not None:
        k, v = k[q_index.long()], v[q_index.long()]
    return span_attention(q, k, v, plan, backend=backend, block_k=SELECTION_BLOCK_K, q_index=q_index)[0]


class _SSATriton(torch.autograd.Function):
    """The three branches and the gating as one autograd node (Triton kernels).

    Keeps for the backward only what its kernels read: q, k, v, k_cmp, v_cmp, gates, the compressed and
    selection outputs and their log-sum-exps; the window output (the cheapest branch) is recomputed in
    the backward. The backward feeds the upstream gradient to every branch with the branch's gate folded
    into its log-sum-exp (no gated copies of dO), accumulates dQ in place and lets each branch output go
    once its branch is done, so its peak is q, two branch outputs, the output, dO and dQ.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, layout: SSALayout, config: SSAConfig):
        q, k, v, k_cmp, v_cmp = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp))
        group = q.shape[1] // k.shape[1]
        scale = q.shape[-1] ** -0.5
        cmp_plan = layout.compressed_plan(group)
        o_cmp, lse_cmp = span_forward(q, k_cmp, v_cmp, cmp_plan, scale)
        idx = select_blocks(q, k_cmp, lse_cmp * LN2, layout, config.topk, config.shared_topk, "triton")
        slc_plan = selection_plan(idx, layout, group)
        o_slc, lse_slc = span_forward(q, k, v, slc_plan, scale, SELECTION_BLOCK_K)
        o_win, _ = _window_forward(q, k, v, layout, config, scale)
        out = gated_sum(gates, o_cmp, o_slc, o_win)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, lse_cmp, lse_slc)
        # the branch outputs are non-differentiable outputs (no grad_fn, so no reference cycle): held in a
        # list that the backward empties, so each can be freed as soon as its branch is done
        ctx.branch_outputs = [o_cmp, o_slc]
        ctx.layout, ctx.config, ctx.plans, ctx.scale = layout, config, (cmp_plan, slc_plan), scale
        ctx.mark_non_differentiable(o_cmp, o_slc, o_win, idx)
        ctx.set_materialize_grads(False)  # no zero gradients for the four inspection outputs (3 x [N, Hq, D])
        return out, o_cmp, o_slc, o_win, idx

    @staticmethod
    def backward(ctx, dout, *_):
        if dout is None:
            return (None,) * 8
        q, k, v, k_cmp, v_cmp, gates, lse_cmp, lse_slc = ctx.saved_tensors
        (cmp_plan, slc_plan), scale = ctx.plans, ctx.scale
        o_cmp, o_slc = ctx.branch_outputs
        ctx.branch_outputs = None
        dout = dout.contiguous()
        dgates = torch.empty(gates.shape, device=gates.device, dtype=torch.float32)
        dq, dkc, dvc, delta = span_backward(dout, q, k_cmp, v_cmp, o_cmp, lse_cmp, cmp_plan, scale, gate=gates[:, 0])
        dgates[:, 0] = delta.sum(1)
        del o_cmp
        dq, dk, dv, delta = span_backward(dout, q, k, v, o_slc, lse_slc, slc_plan, scale, SELECTION_BLOCK_K,
                                          gate=gates[:, 1], dq=dq)
        dgates[:, 1] = delta.sum(1)
        del o_slc
        o_win, (win_plan, q_index, kw, vw, lse_win) = _window_forward(q, k, v, ctx.layout, ctx.config, scale)
        if q_index is None:
            dq, dk, dv, delta = span_backward(dout, q, k, v, o_win, lse_win, win_plan, scale, SELECTION_BLOCK_K,
                                              gate=gates[:, 2], dq=dq, dk=dk, dv=dv)
        else:  # keys in the windows' grouping: their gradients come back in that order
            perm = q_index.long()
            dq, dkw, dvw, delta = span_backward(dout, q, kw, vw, o_win, lse_win, win_plan, scale,
                                                SELECTION_BLOCK_K, q_index=q_index, gate=gates[:, 2], dq=dq)
            dk.index_add_(0, perm, dkw)
            dv.index_add_(0, perm, dvw)
        dgates[:, 2] = delta.sum(1)
        return (dq, dk.to(k.dtype), dv.to(v.dtype), dkc.to(k_cmp.dtype), dvc.to(v_cmp.dtype),
                dgates.to(gates.dtype), None, None)


def _window_forward(q, k, v, layout: SSALayout, config: SSAConfig, scale: float):
    """Window branch kernels (no autograd): (o [N, Hq, D], (plan, q_index, k and v in the windows'
    grouping, lse2))."""
    plan, q_index = layout.window_plan(config.m_win, config.window_shift, q.shape[1] // k.shape[1])
    kw, vw = (k, v) if q_index is None else (k[q_index.long()], v[q_index.long()])
    o, lse2 = span_forward(q, kw, vw, plan, scale, SELECTION_BLOCK_K, q_index)
    return o, (plan, q_index, kw, vw, lse2)


def spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gates, layout: SSALayout, config: SSAConfig,
                             return_branches: bool = False):
    """Gated SSA output [N, Hq, D] from q [N, Hq, D], k/v [N, Hkv, D], compressed k/v [Nc, Hkv, D],
    gates [N, 3] (already sigmoid), all in ``layout`` order. With return_branches also returns
    (o_cmp, o_slc, o_win, idx) (with the Triton backend these carry no gradient)."""
    backend = config.backend
    if backend == "auto":
        backend = "triton" if auto_triton(q, "spatial_sparse_attention") else "torch"
    if backend == "triton":
        if not (q.dtype == k.dtype == v.dtype == k_cmp.dtype == v_cmp.dtype):
            raise ValueError(f"spatial_sparse_attention: q, k, v, k_cmp, v_cmp must share a dtype, got "
                             f"{q.dtype}, {k.dtype}, {v.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
        out, o_cmp, o_slc, o_win, idx = _SSATriton.apply(q, k, v, k_cmp, v_cmp, gates, layout, config)
        return (out, (o_cmp, o_slc, o_win, idx)) if return_branches else out
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, layout, backend)
    idx = select_blocks(q.detach(), k_cmp.detach(), lse, layout, config.topk, config.shared_topk, backend)
    o_slc = selection_attention(q, k, v, idx, layout, backend)
    o_win = ssa_window_attention(q, k, v, layout, config.m_win, config.window_shift, backend)
    g = gates.to(q.dtype)[:, :, None, None]
    out = g[:, 0] * o_cmp + g[:, 1] * o_slc + g[:, 2] * o_win
    return (out, (o_cmp, o_slc, o_win, idx)) if return_branches else out


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------
class SpatialSparseAttention(nn.Module):
    """SSA self-attention over a SparseTensor (feats [N, C], coords [N, 4]); returns one with the same coords.

    Parameters (names follow the official release): proj_q [Hq*D, C], proj_k/proj_v [Hkv*D, C],
    proj_o [C, Hq*D] (no bias); intra_block_pe [m_cmp, m_cmp, m_cmp, Hkv*D] (zero init, added to k
    before compression); compression_key / compression_value; gate.0 Linear(C, 3, no bias) + sigmoid.
    """

    def __init__(self, channels: int, num_heads: int = 32, num_kv_heads: int = 2, head_dim: int | None = None,
                 config: SSAConfig = SSAConfig()):
        super().__init__()
        head_dim = head_dim or channels // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"SpatialSparseAttention: num_heads ({num_heads}) must be a multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim, self.config = num_heads, num_kv_heads, head_dim, config
        kv = num_kv_heads * head_dim
        self.proj_q = nn.Linear(channels, num_heads * head_dim, bias=False)
        self.proj_k = nn.Linear(channels, kv, bias=False)
        self.proj_v = nn.Linear(channels, kv, bias=False)
        self.proj_o = nn.Linear(num_heads * head_dim, channels, bias=False)
        self.intra_block_pe = nn.Parameter(torch.zeros(config.m_cmp, config.m_cmp, config.m_cmp, kv))
        compression = CompressionV1 if config.compression == "v1" else CompressionV2
        self.compression_key = compression(kv)
        self.compression_value = compression(kv)
        self.gate = nn.Sequential(nn.Linear(channels, 3, bias=False), nn.Sigmoid())

    def layout_for(self, x) -> SSALayout:
        """The SSA layout of x's coords, cached in ``x.cache`` (shared by all layers of a forward)."""
        cache = getattr(x, "cache", None)
        key = ("ssa_layout", self.config.m_cmp, self.config.m_slc)
        if cache is not None and key in cache:
            return cache[key]
        layout = build_ssa_layout(x.coords, self.config.m_cmp, self.config.m_slc, getattr(x, "batch_size", None))
        if cache is not None:
            cache[key] = layout
        return layout

    def attend(self, feats: torch.Tensor, layout: SSALayout) -> torch.Tensor:
        """SSA on sorted features [N, C] -> [N, C] (sorted order)."""
        n = feats.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.proj_q(feats).view(n, hq, d)
        k = self.proj_k(feats)
        v = self.proj_v(feats)
        pe = self.intra_block_pe.reshape(-1, hkv * d)[layout.pe_index].to(k.dtype)
        k_cmp = self.compression_key(k + pe, layout).view(-1, hkv, d)
        v_cmp = self.compression_value(v, layout).view(-1, hkv, d)
        gates = self.gate(feats)
        dt = q.dtype  # under autocast the compression modules may return another dtype
        o = spatial_sparse_attention(q, k.view(n, hkv, d).to(dt), v.view(n, hkv, d).to(dt), k_cmp.to(dt),
                                     v_cmp.to(dt), gates, layout, self.config)
        return self.proj_o(o.reshape(n, hq * d))

    def forward(self, x):
        layout = self.layout_for(x)
        out = self.attend(x.feats[layout.perm], layout)
        return x.replace(out[layout.inverse])
