"""adaLN modulation of packed tokens: fused LayerNorm + per-sample modulation, and the gated residual.

Tokens x [N, C] of a batch of samples are packed by sample: ``batch_ids`` [N] int (non-decreasing, values in
0..B-1) gives each row's sample; the modulation rows are per sample ([B, C], e.g. chunks of an adaLN
output). Definitions (the PyTorch references below):

- ``modulated_layer_norm``: y = LN(x) * (one + scale[b]) + shift[b], LN without affine, statistics in fp32;
  one = 1 (adaLN modulation) or 0 (with ``batch_ids`` None and [1, C] rows: an affine LayerNorm with
  weight = scale, bias = shift).
- ``gated_residual``: out = res + h * gate[b] (in res's dtype, the fp32 residual stream).

The Triton kernels never build a per-token [N, C] modulation tensor: the forward gathers the sample's row
inside the kernel; the backward writes dx / dh per row and sums the per-sample gradients (dscale, dshift,
dgate) in registers over the consecutive row tiles of a program (a few programs per multiprocessor), then
adds them with one fp32 atomic per sample present in those rows (rows are sorted by sample, so almost
always one). The backward runs on smaller tiles than the forward (registers): with the forward's tiles and
one atomic per tile it took 2x the time (docs/benchmarks.md). A gather ``mod[batch_ids]`` instead costs an
[N, C] tensor per use and its backward an index_put that walks the thousands of rows of a sample serially.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import auto_triton, sm_count, triton, triton_usable

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_tile(tile, n_rows, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Rows tile * BLOCK_M + [0, BLOCK_M) of a row-major [n_rows, C] tensor: row and column indices,
        their masks, the 2D mask and the element offsets."""
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        rmask, cmask = rows < n_rows, cols < C
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * C + cols[None, :]
        return rows, cols, rmask, cmask, mask, offs

    @triton.jit
    def _mod_ln_fwd_kernel(X, Y, SHIFT, SCALE, IDS, MEAN, RSTD, n_rows, C, stride_mod, eps,
                           ONE: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        rows, cols, rmask, cmask, mask, offs = _row_tile(tl.program_id(0), n_rows, C, BLOCK_M, BLOCK_C)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        if HAS_IDS:
            b = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
        else:
            b = tl.zeros([BLOCK_M], dtype=tl.int64)
        moffs = b[:, None] * stride_mod + cols[None, :]
        scale = tl.load(SCALE + moffs, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + moffs, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (scale + ONE) + shift
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _segment_sum(OUT, acc, cur, vals, b, rmask, cols, cmask, C):
        """Per-sample column sums of vals [BLOCK_M, BLOCK_C] (rows sorted by sample b, rows out of range
        zero), carried over a program's tiles: acc [BLOCK_M, BLOCK_C] holds sample cur's running sums (-1:
        none yet), summed over its rows only when written. A tile of sample cur only adds to acc; otherwise
        acc goes to OUT[cur], each other sample of the tile but the last to its OUT row (one fp32 atomic
        each), and the last one's rows become acc. Returns (acc, cur)."""
        lo = tl.min(tl.where(rmask, b, 2147483647), axis=0)
        hi = tl.max(tl.where(rmask, b, -1), axis=0)
        if (lo == hi) & (lo == cur):
            acc += vals
        else:
            _flush(OUT, acc, cur, cols, cmask, C)
            for s in range(lo, hi):
                sel = (rmask & (b == s))[:, None]
                tl.atomic_add(OUT + s * C + cols, tl.sum(tl.where(sel, vals, 0.0), axis=0), mask=cmask,
                              sem="relaxed")
            acc = tl.where((rmask & (b == hi))[:, None], vals, 0.0)
            cur = hi
        return acc, cur

    @triton.jit
    def _flush(OUT, acc, cur, cols, cmask, C):
        """OUT[cur] += the column sums of acc [BLOCK_M, BLOCK_C] unless cur < 0 (no rows yet)."""
        if cur >= 0:
            tl.atomic_add(OUT + cur * C + cols, tl.sum(acc, axis=0), mask=cmask, sem="relaxed")

    @triton.jit
    def _mod_ln_bwd_kernel(DY, X, SCALE, IDS, MEAN, RSTD, DX, DSCALE, DSHIFT, n_rows, C, stride_mod,
                           tiles_per_program, ONE: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        acc_scale = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        acc_shift = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        cur = tl.program_id(0) * 0 - 1  # the sample both sums are carrying (they share the rows)
        for i in range(tiles_per_program):
            tile = tl.program_id(0) * tiles_per_program + i
            rows, cols, rmask, cmask, mask, offs = _row_tile(tile, n_rows, C, BLOCK_M, BLOCK_C)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            if HAS_IDS:
                b = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int32)
            else:
                b = tl.zeros([BLOCK_M], dtype=tl.int32)
            scale = tl.load(SCALE + b[:, None].to(tl.int64) * stride_mod + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * (scale + ONE)
            c1 = tl.sum(g * xhat, axis=1) / C
            c2 = tl.sum(g, axis=1) / C
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            acc_scale, _ = _segment_sum(DSCALE, acc_scale, cur, dy * xhat, b, rmask, cols, cmask, C)
            acc_shift, cur = _segment_sum(DSHIFT, acc_shift, cur, dy, b, rmask, cols, cmask, C)
        cols = tl.arange(0, BLOCK_C)
        _flush(DSCALE, acc_scale, cur, cols, cols < C, C)
        _flush(DSHIFT, acc_shift, cur, cols, cols < C, C)

    @triton.jit
    def _gated_res_fwd_kernel(RES, H, GATE, IDS, OUT, n_rows, C, stride_mod, BLOCK_M: tl.constexpr,
                              BLOCK_C: tl.constexpr):
        rows, cols, rmask, cmask, mask, offs = _row_tile(tl.program_id(0), n_rows, C, BLOCK_M, BLOCK_C)
        b = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
        gate = tl.load(GATE + b[:, None] * stride_mod + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        res = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (res + h * gate).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_res_bwd_kernel(DOUT, H, GATE, IDS, DH, DGATE, n_rows, C, stride_mod, tiles_per_program,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        cur = tl.program_id(0) * 0 - 1
        for i in range(tiles_per_program):
            tile = tl.program_id(0) * tiles_per_program + i
            rows, cols, rmask, cmask, mask, offs = _row_tile(tile, n_rows, C, BLOCK_M, BLOCK_C)
            b = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int32)
            gate = tl.load(GATE + b[:, None].to(tl.int64) * stride_mod + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
            dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + offs, (dout * gate).to(DH.dtype.element_ty), mask=mask)
            acc, cur = _segment_sum(DGATE, acc, cur, dout * h, b, rmask, cols, cmask, C)
        cols = tl.arange(0, BLOCK_C)
        _flush(DGATE, acc, cur, cols, cols < C, C)


def _tiles(c: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_C >= c, num_warps): about 8192 elements per program."""
    block_c = triton.next_power_of_2(c)
    block_m = max(1, 8192 // block_c) if block_c <= 8192 else 1
    return block_m, block_c, 8 if block_m * block_c >= 4096 else 4


def _bwd_tiles(c: int) -> tuple[int, int, int]:
    """Backward tiles (BLOCK_M rows, BLOCK_C >= c, num_warps): about 1024 elements over 8 warps, fastest of
    1-8 rows x 1024 on an H200 (docs/benchmarks.md). The forward's 8192-element tiles cost the backward (which
    holds x, dy, the modulation rows and the running sums) 244 registers per thread."""
    block_c = triton.next_power_of_2(c)
    return max(1, 1024 // block_c), block_c, 8


BWD_PROGRAMS_PER_SM = 4  # backward programs per multiprocessor (each sums its row tiles' per-sample gradients)


def _bwd_grid(n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(programs, consecutive row tiles per program) of the backward kernels."""
    per_program = triton.cdiv(n_tiles, BWD_PROGRAMS_PER_SM * sm_count(device))
    return triton.cdiv(n_tiles, per_program), per_program


def _rows(t: torch.Tensor, name: str, c: int) -> torch.Tensor:
    if t.dim() != 2 or t.shape[1] != c:
        raise ValueError(f"modulation: {name} must be [B, {c}] per-sample rows, got {tuple(t.shape)}")
    return t.contiguous()


class _ModulatedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, batch_ids, eps, one, out_dtype):
        n, c = x.shape
        x = x.contiguous()
        shift, scale = _rows(shift, "shift", c), _rows(scale, "scale", c)
        y = torch.empty((n, c), device=x.device, dtype=out_dtype)
        mean = torch.empty(n, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        bm, bc, warps = _tiles(c)
        has_ids = batch_ids is not None
        ids = batch_ids if has_ids else mean  # unused pointer when every row reads row 0
        _mod_ln_fwd_kernel[(triton.cdiv(n, bm),)](x, y, shift, scale, ids, mean, rstd, n, c, c, eps, ONE=one,
                                                  HAS_IDS=has_ids, BLOCK_M=bm, BLOCK_C=bc, num_warps=warps)
        ctx.save_for_backward(x, scale, batch_ids, mean, rstd)
        ctx.one, ctx.dtypes = one, (shift.dtype, scale.dtype, shift.shape[0])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, batch_ids, mean, rstd = ctx.saved_tensors
        shift_dtype, scale_dtype, rows = ctx.dtypes
        n, c = x.shape
        dx = torch.empty_like(x)
        dscale = torch.zeros((rows, c), device=x.device, dtype=torch.float32)
        dshift = torch.zeros_like(dscale)
        bm, bc, warps = _bwd_tiles(c)
        has_ids = batch_ids is not None
        ids = batch_ids if has_ids else mean
        programs, per_program = _bwd_grid(triton.cdiv(n, bm), x.device)
        _mod_ln_bwd_kernel[(programs,)](dy.contiguous(), x, scale, ids, mean, rstd, dx, dscale, dshift, n, c, c,
                                        per_program, ONE=ctx.one, HAS_IDS=has_ids, BLOCK_M=bm, BLOCK_C=bc,
                                        num_warps=warps)
        return dx, dshift.to(shift_dtype), dscale.to(scale_dtype), None, None, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, res, h, gate, batch_ids):
        n, c = res.shape
        res, h, gate = res.contiguous(), h.contiguous(), _rows(gate, "gate", c)
        out = torch.empty_like(res)
        bm, bc, warps = _tiles(c)
        _gated_res_fwd_kernel[(triton.cdiv(n, bm),)](res, h, gate, batch_ids, out, n, c, c, BLOCK_M=bm, BLOCK_C=bc,
                                                     num_warps=warps)
        ctx.save_for_backward(h, gate, batch_ids)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, gate, batch_ids = ctx.saved_tensors
        n, c = h.shape
        dh = torch.empty_like(h)
        dgate = torch.zeros(gate.shape, device=h.device, dtype=torch.float32)
        bm, bc, warps = _bwd_tiles(c)
        programs, per_program = _bwd_grid(triton.cdiv(n, bm), h.device)
        _gated_res_bwd_kernel[(programs,)](dout.contiguous(), h, gate, batch_ids, dh, dgate, n, c, c, per_program,
                                           BLOCK_M=bm, BLOCK_C=bc, num_warps=warps)
        return dout, dh, dgate.to(gate.dtype), None


# ----------------------------------------------------------------------------------------------
# References (the definitions) and dispatch
# ----------------------------------------------------------------------------------------------
def _per_row(rows: torch.Tensor, batch_ids: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    rows = rows.to(dtype)
    return rows if batch_ids is None else rows[batch_ids.long()]


def modulated_layer_norm_reference(x, shift, scale, batch_ids, eps: float = 1e-6, one: float = 1.0,
                                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = LN(x) * (one + scale[b]) + shift[b] computed in (at least) fp32, returned in out_dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.layer_norm(x.to(acc), (x.shape[1],), eps=eps)
    y = h * (one + _per_row(scale, batch_ids, acc)) + _per_row(shift, batch_ids, acc)
    return y.to(out_dtype or x.dtype)


def gated_residual_reference(res, h, gate, batch_ids) -> torch.Tensor:
    """res + h * gate[b] in res's dtype (products in at least fp32)."""
    acc = torch.promote_types(res.dtype, torch.float32)
    return (res.to(acc) + h.to(acc) * _per_row(gate, batch_ids, acc)).to(res.dtype)


def _use_triton(backend: str, x: torch.Tensor, fn: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"{fn}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":  # the kernels compute in fp32: float64 (reference tests) stays on the reference
        return x.is_cuda and x.dtype != torch.float64 and auto_triton(x, fn)
    if backend == "triton" and not triton_usable(x):
        raise RuntimeError(f"{fn}: the triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    return backend == "triton"


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch_ids: torch.Tensor | None,
                         eps: float = 1e-6, *, one: float = 1.0, out_dtype: torch.dtype | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """x [N, C] -> LN(x) * (one + scale[b]) + shift[b] in ``out_dtype`` (default x's).

    shift, scale: [B, C] per-sample rows; batch_ids [N] int (sorted) row -> sample, or None with [1, C]
    rows applied to every token (one=0: affine LayerNorm with weight = scale, bias = shift).
    backend: 'triton' (CUDA, or the interpreter), 'torch' (the reference), 'auto' (triton on CUDA).
    """
    if x.dim() != 2:
        raise ValueError(f"modulated_layer_norm: x must be [N, C], got {tuple(x.shape)}")
    if batch_ids is None and shift.shape[0] != 1:
        raise ValueError("modulated_layer_norm: without batch_ids, shift/scale must be a single [1, C] row")
    out_dtype = out_dtype or x.dtype
    if not _use_triton(backend, x, "modulated_layer_norm"):
        return modulated_layer_norm_reference(x, shift, scale, batch_ids, eps, one, out_dtype)
    return _ModulatedLayerNorm.apply(x, shift, scale, batch_ids, float(eps), float(one), out_dtype)


def gated_residual(res: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, batch_ids: torch.Tensor,
                   *, backend: str = "auto") -> torch.Tensor:
    """res [N, C] + h [N, C] * gate[b] ([B, C] per-sample rows, batch_ids [N] sorted) in res's dtype."""
    if res.shape != h.shape or res.dim() != 2:
        raise ValueError(f"gated_residual: res and h must be the same [N, C], got {tuple(res.shape)} and {tuple(h.shape)}")
    if not _use_triton(backend, res, "gated_residual"):
        return gated_residual_reference(res, h, gate, batch_ids)
    return _GatedResidual.apply(res, h, gate, batch_ids)
