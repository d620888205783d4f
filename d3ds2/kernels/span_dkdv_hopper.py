"""dK/dV pass of span attention for Hopper (sm_90), in Gluon: the Triton kernel's work items with asynchronous wgmma.

Same work and arguments as ``_span_bwd_dkdv_kernel`` in :mod:`d3ds2.kernels.span_backward` (persistent programs,
items = (KV head, BK-key chunk, up to PER_ITEM selecting queries), fp32 atomics into dK/dV), with the folded
columns (``COLS``: the log-sum-exp over the scale and delta, each split into bf16-exact terms) so that the
two score matmuls deliver c*S - lse and dP - delta directly. What Gluon adds over Triton's schedule of the
same loop (one warpgroup, tiles of BK keys x R = BQ*G query rows):
- the S^T and dP^T matmuls are issued together and waited on one at a time: the exp2 of P^T runs while the
  tensor cores compute dP^T, and the dV matmul runs while dS^T is formed;
- the q / dO rows and their folded columns are copied into a ring of STAGES shared-memory buffers with
  cp.async, STAGES - 1 tiles ahead of the matmuls.
At 3 x 10,655 tokens (32 q heads, 2 KV heads, head dim 32, bf16) it takes 6.80 ms on an H200 against the
Triton kernel's 8.50 (docs/benchmarks.md, "SS-DiT v1.1 step"). GPU-only: Gluon kernels do not
run in the CPU interpreter; tests/test_kernel_sass.py compiles it for sm_90 on any machine.
"""
from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except ImportError:  # pragma: no cover - older triton without Gluon
    gluon = None

STAGES = 2  # shared-memory ring of q / dO tiles (2, 3 and 4 time the same on an H200)


def hopper_dkdv_usable(q: torch.Tensor, rows: int, block_kv: int) -> bool:
    """Whether this kernel serves ``q`` [N, Hq, D]: Gluon present, an sm_90 GPU, 16-bit inputs, head dim 32 or
    64, tiles of 64 keys (the wgmma M of one warpgroup) x ``rows`` q rows (a power of two, 64..256)."""
    d = q.shape[-1]
    return (gluon is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d in (32, 64)
            and block_kv == 64 and 64 <= rows <= 256 and rows & (rows - 1) == 0
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def span_dkdv_hopper(grid: tuple, args: tuple, constexprs: dict) -> None:
    """Launch the kernel with the Triton kernel's arguments (``args``: tensors and scalars in its order,
    ``constexprs``: HQ .. HAS_QIDX)."""
    _span_dkdv_hopper_kernel[grid](*args, **constexprs, STAGES=STAGES, num_warps=4)


if gluon is not None:
    from d3ds2.kernels.span_work import _work_item

    @gluon.jit
    def _tile_rows(QIDX, PQ, j0, j_hi, kvh, HQ: gl.constexpr, G: gl.constexpr, R: gl.constexpr,
                   HAS_QIDX: gl.constexpr, layout: gl.constexpr):
        """The R q rows of a tile, laid out along dim 0 of ``layout``: (row numbers in the [N * Hq] rows of q,
        valid) for the queries PQ[j0 : j0 + R // G] (valid while < j_hi) x the G q heads of KV head kvh."""
        r = gl.arange(0, R, gl.SliceLayout(1, layout))
        jj = j0 + r // G
        valid = jj < j_hi
        qrow = gl.load(PQ + jj, mask=valid, other=0)
        if HAS_QIDX:
            qrow = gl.load(QIDX + qrow, mask=valid, other=0)
        return qrow * HQ + kvh * G + r % G, valid

    @gluon.jit
    def _copy_tile(Q, DO, COLS, QIDX, PQ, q_buf, do_buf, xl_buf, xd_buf, j0, j_hi, kvh,
                   HQ: gl.constexpr, G: gl.constexpr, D: gl.constexpr, R: gl.constexpr, HAS_QIDX: gl.constexpr,
                   ROWS_L: gl.constexpr, COLS_L: gl.constexpr):
        """Start the cp.async copies of one tile into its buffers: the q and dO rows [R, D] and their folded
        columns [R, 16] each (see _tile_rows); rows past j_hi are zero-filled. One commit group."""
        row, valid = _tile_rows(QIDX, PQ, j0, j_hi, kvh, HQ, G, R, HAS_QIDX, ROWS_L)
        d = gl.arange(0, D, gl.SliceLayout(0, ROWS_L))
        off = (row * D)[:, None] + d[None, :]
        async_copy.async_copy_global_to_shared(q_buf, Q + off, mask=valid[:, None])
        async_copy.async_copy_global_to_shared(do_buf, DO + off, mask=valid[:, None])
        row, valid = _tile_rows(QIDX, PQ, j0, j_hi, kvh, HQ, G, R, HAS_QIDX, COLS_L)
        e = gl.arange(0, 16, gl.SliceLayout(0, COLS_L))
        off = (row * 16)[:, None] + e[None, :]
        mask = valid[:, None] & (e[None, :] < 8)
        async_copy.async_copy_global_to_shared(xl_buf, COLS + off, mask=mask)
        async_copy.async_copy_global_to_shared(xd_buf, COLS + off + 8, mask=mask)
        async_copy.commit_group()

    @gluon.jit
    def _span_dkdv_hopper_kernel(Q, K, V, DO, COLS, DK, DV, QIDX, CH_SPAN, CH_START, SOFF, POFF, PQ, CUM_ITEMS,
                                 NEXT_ITEM, n_slots, n_chunk_slots, n_spans, sm_scale, sm_scale_log2,
                                 HQ: gl.constexpr, HKV: gl.constexpr, HI: gl.constexpr, G: gl.constexpr,
                                 D: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr, PER_ITEM: gl.constexpr,
                                 SEARCH_STEPS: gl.constexpr, HAS_QIDX: gl.constexpr, STAGES: gl.constexpr):
        R: gl.constexpr = BQ * G
        dtype: gl.constexpr = Q.dtype.element_ty
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, R, 16])
        ACC_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D, 16])
        A_S: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_L, k_width=2)
        A_ACC: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_L, k_width=2)
        ROWS_L: gl.constexpr = gl.BlockedLayout([1, 8], [256 // D, D // 8], [4, 1], [1, 0])
        COLS_L: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        ROW_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, D], dtype)
        COL_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, 16], dtype)
        q_s = gl.allocate_shared_memory(dtype, [STAGES, R, D], ROW_SMEM)
        do_s = gl.allocate_shared_memory(dtype, [STAGES, R, D], ROW_SMEM)
        xl_s = gl.allocate_shared_memory(dtype, [STAGES, R, 16], COL_SMEM)
        xd_s = gl.allocate_shared_memory(dtype, [STAGES, R, 16], COL_SMEM)

        # A operand [BK, 16] of -1s in the folded columns: S^T - lse / c and dP^T - delta in the matmuls
        e = gl.arange(0, 16, gl.SliceLayout(0, COLS_L))
        rk = gl.arange(0, BK, gl.SliceLayout(1, COLS_L))
        minus = gl.where((e[None, :] < 8) & (rk[:, None] >= 0), -1.0, 0.0).to(dtype)
        minus = gl.convert_layout(minus, A_S)
        zero_s = gl.zeros([BK, R], gl.float32, S_L)
        n_items = gl.load(CUM_ITEMS + n_slots - 1)
        item = gl.atomic_add(NEXT_ITEM, 1)
        while item < n_items:
            kvh, k0, k_hi, j_lo, j_hi = _work_item(item, CUM_ITEMS, CH_SPAN, CH_START, SOFF, POFF, n_slots,
                                                   n_chunk_slots, n_spans, HI, PER_ITEM, SEARCH_STEPS)
            part_keys = k0 + BK > k_hi

            kn = k0 + gl.arange(0, BK, gl.SliceLayout(1, ROWS_L))
            d = gl.arange(0, D, gl.SliceLayout(0, ROWS_L))
            kv_off = (kn[:, None] * HKV + kvh) * D + d[None, :]
            k_op = gl.convert_layout(gl.load(K + kv_off, mask=(kn < k_hi)[:, None], other=0.0), A_S)
            v_op = gl.convert_layout(gl.load(V + kv_off, mask=(kn < k_hi)[:, None], other=0.0), A_S)
            kmask_s = (k0 + gl.arange(0, BK, gl.SliceLayout(1, S_L))) < k_hi
            dk = gl.zeros([BK, D], gl.float32, ACC_L)
            dv = gl.zeros([BK, D], gl.float32, ACC_L)
            n_tiles = (j_hi - j_lo + BQ - 1) // BQ
            for s in gl.static_range(STAGES - 1):
                _copy_tile(Q, DO, COLS, QIDX, PQ, q_s.index(s), do_s.index(s), xl_s.index(s), xd_s.index(s),
                           j_lo + s * BQ, j_hi, kvh, HQ, G, D, R, HAS_QIDX, ROWS_L, COLS_L)
            for t in range(n_tiles):
                b = t % STAGES
                async_copy.wait_group(STAGES - 2)  # tile t is in its buffer
                gl.thread_barrier()
                fence_async_shared()
                qb = q_s.index(b)
                dob = do_s.index(b)
                st = warpgroup_mma(k_op, qb.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                st = warpgroup_mma(minus, xl_s.index(b).permute((1, 0)), st, is_async=True)
                dpt = warpgroup_mma(v_op, dob.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dpt = warpgroup_mma(minus, xd_s.index(b).permute((1, 0)), dpt, is_async=True)
                # the buffer of tile t - 1 (its matmuls were waited on) takes tile t + STAGES - 1
                nb = (t + STAGES - 1) % STAGES
                _copy_tile(Q, DO, COLS, QIDX, PQ, q_s.index(nb), do_s.index(nb), xl_s.index(nb), xd_s.index(nb),
                           j_lo + (t + STAGES - 1) * BQ, j_hi, kvh, HQ, G, D, R, HAS_QIDX, ROWS_L, COLS_L)
                st = warpgroup_mma_wait(num_outstanding=2, deps=[st])
                pt = gl.exp2(st * sm_scale_log2)
                j0 = j_lo + t * BQ
                if (j0 + BQ > j_hi) | part_keys:
                    jm_s = (j0 + gl.arange(0, R, gl.SliceLayout(0, S_L)) // G) < j_hi
                    pt = gl.where(kmask_s[:, None] & jm_s[None, :], pt, 0.0)
                ptb = gl.convert_layout(pt.to(dtype), A_ACC)
                dv = warpgroup_mma(ptb, dob, dv, is_async=True)
                dpt = warpgroup_mma_wait(num_outstanding=1, deps=[dpt])
                dsb = gl.convert_layout((pt * dpt).to(dtype), A_ACC)
                dk = warpgroup_mma(dsb, qb, dk, is_async=True)
                dv, dk, ptb, dsb = warpgroup_mma_wait(num_outstanding=0, deps=[dv, dk, ptb, dsb])
            async_copy.wait_group(0)  # the zero-filled copies past the last tile, before the buffers are reused
            kn_a = k0 + gl.arange(0, BK, gl.SliceLayout(1, ACC_L))
            d_a = gl.arange(0, D, gl.SliceLayout(0, ACC_L))
            acc_off = (kn_a[:, None] * HKV + kvh) * D + d_a[None, :]
            amask = (kn_a < k_hi)[:, None]
            gl.atomic_add(DK + acc_off, dk * sm_scale, mask=amask, sem="relaxed")
            gl.atomic_add(DV + acc_off, dv, mask=amask, sem="relaxed")
            item = gl.atomic_add(NEXT_ITEM, 1)
