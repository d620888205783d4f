"""Implicit-GEMM sparse convolution over a neighbour table (Triton), its PyTorch reference and autograd.

Definitions: ``nbr [K, N_out]`` int32 holds, for kernel offset k and output row o, the input row that o
reads through k, or -1 where that neighbour is absent. With weights ``W [K, Cin, Cout]``:

    out[o] = sum_k feats[nbr[k, o]] @ W[k]                      (absent neighbours contribute 0)

- forward: one program per (BLOCK_N output rows, BLOCK_CO output channels); it walks the K offsets and
  Cin in BLOCK_CI chunks as one flat, software-pipelined loop, gathers the input rows (masked loads, so
  absent neighbours cost no memory traffic), and accumulates ``tl.dot`` in float32.
- dgrad of a submanifold conv: the relation is symmetric (p + o is a neighbour of p through o exactly
  when p is a neighbour of p + o through -o, and offset -o is index K-1-k in centred kernel order), so
  ``dfeats = gather_conv(dout, W.flip(0).transpose(1, 2), nbr)``: the forward kernel again.
- wgrad: ``dW[k] = sum_o feats[nbr[k, o]]^T @ dout[o]``; one program per (offset, Cin tile, Cout tile,
  slice of the rows), float32 partial sums added into dW with atomics (split-N).

Inputs in float16 / bfloat16 accumulate in float32; float32 inputs use IEEE float32 products (like
torch's default matmul). Works in the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported) with float32 inputs; bfloat16 ``tl.dot`` is not exact there.
"""
from __future__ import annotations

import torch

from .runtime import auto_triton, interpreting, sm_count, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(feats: torch.Tensor) -> bool:
    """Whether the convolution kernels can take ``feats`` (a supported dtype on a device Triton runs on); warns
    once where ``feats`` is on a GPU that Triton cannot serve (see :func:`~d3ds2.kernels.runtime.auto_triton`)."""
    return feats.dtype in DTYPES and auto_triton(feats, "sparse convolution")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def gather_conv_reference(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """out [N_out, Cout] = sum_k feats[nbr[k]] @ weight[k]; feats [N_in, Cin], weight [K, Cin, Cout].

    Plain PyTorch (differentiable through autograd); accumulates in float32 for half inputs.
    """
    acc = torch.float32 if feats.dtype in (torch.float16, torch.bfloat16) else feats.dtype
    out = feats.new_zeros(nbr.shape[1], weight.shape[2], dtype=acc)
    for k in range(nbr.shape[0]):
        idx = nbr[k].long()
        g = feats.index_select(0, idx.clamp_min(0)) * (idx >= 0).unsqueeze(1).to(feats.dtype)
        out = out + (g @ weight[k]).to(acc)
    return out.to(feats.dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
_INTERPRETER_SHAPE = (64, 32, 32, 4, 1)  # small tiles so that tests cross several row and channel tiles


def _configs(shapes):
    """Autotune configs from (BLOCK_N, BLOCK_A, BLOCK_B, warps, stages) tuples; one in the interpreter."""
    if interpreting():
        shapes = [_INTERPRETER_SHAPE]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s)
        for n, a, b, w, s in shapes
    ]


def _fit(block: int, channels: int) -> bool:
    """A channel tile no wider than the channels (rounded up to a power of 2), and 16-wide only for < 32."""
    return block <= max(16, triton.next_power_of_2(channels)) and (block >= 32 or channels < 32)


def _prune_fwd(configs, named_args, **kwargs):
    """Drop configs whose channel tiles exceed the channels (BLOCK_A tiles Cin, BLOCK_B tiles Cout)."""
    cin, cout = kwargs.get("CIN", named_args.get("CIN")), kwargs.get("COUT", named_args.get("COUT"))
    kept = [c for c in configs if _fit(c.kwargs["BLOCK_A"], cin) and _fit(c.kwargs["BLOCK_B"], cout)]
    return kept or configs[-1:]


# (BLOCK_N rows, BLOCK_A = Cin chunk, BLOCK_B = Cout tile, warps, stages); the last fits 16 channels.
_FWD_SHAPES = [
    (128, 32, 64, 4, 3),
    (128, 64, 128, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 32, 32, 4, 3),
    (64, 32, 32, 4, 4),
    (128, 16, 16, 4, 3),
]
# wgrad: (BLOCK_N rows reduced per step, BLOCK_A = Cin tile, BLOCK_B = Cout tile, warps, stages)
_WGRAD_SHAPES = [
    (64, 64, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 128, 8, 3),
    (128, 32, 32, 4, 3),
    (256, 32, 32, 8, 3),
    (64, 16, 16, 4, 3),
]

if triton is not None:

    @triton.autotune(configs=_configs(_FWD_SHAPES), key=["CIN", "COUT"], prune_configs_by={"early_config_prune": _prune_fwd})
    @triton.jit
    def _gather_conv_kernel(
        x_ptr, w_ptr, nbr_ptr, out_ptr, N, K,
        CIN: tl.constexpr, COUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        co = pid_c * BLOCK_B + tl.arange(0, BLOCK_B)
        comask = co < COUT
        cr = tl.arange(0, BLOCK_A)
        NUM_CI: tl.constexpr = (CIN + BLOCK_A - 1) // BLOCK_A
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        for t in range(K * NUM_CI):
            k = t // NUM_CI
            ci = (t % NUM_CI) * BLOCK_A + cr
            cimask = ci < CIN
            idx = tl.load(nbr_ptr + k.to(tl.int64) * N + rows, mask=rmask, other=-1)
            present = idx >= 0
            src = tl.where(present, idx, 0).to(tl.int64)
            a = tl.load(x_ptr + src[:, None] * CIN + ci[None, :], mask=present[:, None] & cimask[None, :], other=0.0)
            b = tl.load(
                w_ptr + (k * CIN + ci[:, None]).to(tl.int64) * COUT + co[None, :],
                mask=cimask[:, None] & comask[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = out_ptr + rows[:, None].to(tl.int64) * COUT + co[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & comask[None, :])

    @triton.autotune(
        configs=_configs(_WGRAD_SHAPES),
        key=["CIN", "COUT"],
        prune_configs_by={"early_config_prune": _prune_fwd},
        reset_to_zero=["dw_ptr"],
    )
    @triton.jit
    def _gather_wgrad_kernel(
        x_ptr, g_ptr, nbr_ptr, dw_ptr, N,
        CIN: tl.constexpr, COUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        k = tl.program_id(0)
        NUM_CO: tl.constexpr = (COUT + BLOCK_B - 1) // BLOCK_B
        pid_ci = tl.program_id(1) // NUM_CO
        pid_co = tl.program_id(1) % NUM_CO
        split = tl.num_programs(2)
        per = tl.cdiv(tl.cdiv(N, split), BLOCK_N) * BLOCK_N
        start = tl.program_id(2) * per
        end = tl.minimum(start + per, N)
        ci = pid_ci * BLOCK_A + tl.arange(0, BLOCK_A)
        co = pid_co * BLOCK_B + tl.arange(0, BLOCK_B)
        cimask = ci < CIN
        comask = co < COUT
        nbr_k = nbr_ptr + k.to(tl.int64) * N
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            idx = tl.load(nbr_k + rows, mask=rows < end, other=-1)
            present = idx >= 0
            src = tl.where(present, idx, 0).to(tl.int64)
            a = tl.load(x_ptr + src[:, None] * CIN + ci[None, :], mask=present[:, None] & cimask[None, :], other=0.0)
            g = tl.load(
                g_ptr + rows[:, None].to(tl.int64) * COUT + co[None, :],
                mask=present[:, None] & comask[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
        dw = dw_ptr + (k * CIN + ci[:, None]).to(tl.int64) * COUT + co[None, :]
        tl.atomic_add(dw, acc, mask=cimask[:, None] & comask[None, :])


if triton is not None:

    @triton.jit
    def _subm_table_kernel(keys_ptr, nbr_ptr, N, STEPS, KS: tl.constexpr, BLOCK: tl.constexpr):
        """nbr[(cx·KS + cy)·KS + cz, p] = row of key p + (cx, cy, cz) - KS//2 (nbr pre-filled with -1)."""
        R: tl.constexpr = KS // 2
        MAXC: tl.constexpr = 65535
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < N
        key = tl.load(keys_ptr + rows, mask=rmask, other=0)
        x = (key >> 32) & MAXC
        y = (key >> 16) & MAXC
        z = key & MAXC
        batch = key - (x << 32) - (y << 16) - z
        zlo = tl.maximum(z - R, 0)
        for c in tl.static_range(KS * KS):
            xn = x + (c // KS - R)
            yn = y + (c % KS - R)
            ok = rmask & (xn >= 0) & (xn <= MAXC) & (yn >= 0) & (yn <= MAXC)
            col = batch + (xn << 32) + (yn << 16)
            target = col + zlo
            lo = tl.zeros([BLOCK], dtype=tl.int32)
            hi = tl.where(ok, N, 0)
            for _ in range(STEPS):  # lower bound of target in the sorted keys
                active = lo < hi
                mid = (lo + hi) // 2
                v = tl.load(keys_ptr + mid, mask=active, other=0)
                right = v < target
                lo = tl.where(active & right, mid + 1, lo)
                hi = tl.where(active & ~right, mid, hi)
            for i in tl.static_range(KS):  # the column's z-neighbours are the next KS keys at most
                pos = lo + i
                hit = ok & (pos < N)
                v = tl.load(keys_ptr + pos, mask=hit, other=-1)
                dz = (v & MAXC) - z + R
                hit = hit & ((v - (v & MAXC)) == col) & (dz >= 0) & (dz < KS)
                k = c * KS + dz
                tl.store(nbr_ptr + k * N + rows, pos, mask=hit)


def subm_table(keys: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[K³, N] int32 submanifold neighbour table from sorted packed keys (dilation 1), one Triton launch.

    One lower-bound binary search per (x, y) column offset; the column's neighbours are among the next
    ``kernel_size`` keys. Keys pack (batch, x, y, z) as ``batch << 48 | x << 32 | y << 16 | z``.
    """
    n = keys.shape[0]
    nbr = torch.full((kernel_size**3, n), -1, dtype=torch.int32, device=keys.device)
    if n == 0:
        return nbr
    block = 64 if interpreting() else 256
    _subm_table_kernel[(triton.cdiv(n, block),)](keys.contiguous(), nbr, n, n.bit_length(), KS=kernel_size, BLOCK=block)
    return nbr


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> None:
    if weight.dim() != 3 or weight.shape[0] != nbr.shape[0] or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"kernels.sparse_conv: weight must be [K={nbr.shape[0]}, Cin={feats.shape[1]}, Cout], got {tuple(weight.shape)}"
        )
    if nbr.dtype != torch.int32 or nbr.dim() != 2:
        raise TypeError(f"kernels.sparse_conv: nbr must be an int32 [K, N] table, got {nbr.dtype} {tuple(nbr.shape)}")
    if feats.dtype != weight.dtype or feats.dtype not in DTYPES:
        raise TypeError(f"kernels.sparse_conv: feats and weight must share one of {DTYPES}, got {feats.dtype}/{weight.dtype}")


def gather_conv(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Triton forward: out [N_out, Cout] = sum_k feats[nbr[k]] @ weight[k] (no autograd)."""
    _check(feats, weight, nbr)
    k, n = nbr.shape
    cout = weight.shape[2]
    out = torch.empty(n, cout, dtype=feats.dtype, device=feats.device)
    if n == 0:
        return out
    if feats.shape[0] == 0:
        return out.zero_()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(cout, meta["BLOCK_B"]))  # noqa: E731
    _gather_conv_kernel[grid](
        feats.contiguous(), weight.contiguous(), nbr.contiguous(), out, n, k,
        CIN=feats.shape[1], COUT=cout, PRECISION=_precision(feats.dtype),
    )
    return out


def gather_conv_wgrad(feats: torch.Tensor, grad_out: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Triton weight gradient: dW [K, Cin, Cout] float32 = sum_o feats[nbr[k, o]]^T @ grad_out[o]."""
    k, n = nbr.shape
    cin, cout = feats.shape[1], grad_out.shape[1]
    dw = torch.zeros(k, cin, cout, dtype=torch.float32, device=feats.device)
    if n == 0 or feats.shape[0] == 0:
        return dw
    target = 4 * sm_count(feats.device, cpu=4)  # programs to keep every SM busy with a few resident blocks

    def grid(meta):
        tiles = triton.cdiv(cin, meta["BLOCK_A"]) * triton.cdiv(cout, meta["BLOCK_B"])
        split = max(1, min(triton.cdiv(n, 4 * meta["BLOCK_N"]), triton.cdiv(target, k * tiles)))
        return (k, tiles, split)

    _gather_wgrad_kernel[grid](
        feats.contiguous(), grad_out.contiguous(), nbr.contiguous(), dw, n,
        CIN=cin, COUT=cout, PRECISION=_precision(feats.dtype),
    )
    return dw


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _SubmConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(feats, weight, nbr)
        return gather_conv(feats, weight, nbr)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight, nbr = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_feats = gather_conv(grad_out, weight.flip(0).transpose(1, 2).contiguous(), nbr)
        if ctx.needs_input_grad[1]:
            grad_weight = gather_conv_wgrad(feats, grad_out, nbr).to(weight.dtype)
        return grad_feats, grad_weight, None


def submconv(feats: torch.Tensor, weight: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Differentiable submanifold conv: feats [N, Cin], weight [K, Cin, Cout], symmetric nbr [K, N] -> [N, Cout].

    ``nbr`` must be a submanifold table (centred odd kernel, offsets in ``kernel_offsets`` order, same
    input and output sites), which makes the input gradient another forward pass.
    """
    _check(feats, weight, nbr)
    if nbr.shape[1] != feats.shape[0]:
        raise ValueError(f"submconv: nbr has {nbr.shape[1]} output rows but feats {feats.shape[0]}; a submanifold table is [K, N]")
    return _SubmConvFunction.apply(feats.contiguous(), weight.contiguous(), nbr)
