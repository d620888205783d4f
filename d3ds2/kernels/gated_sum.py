"""Gated sum of three attention branches (SSA's gates), fused: one pass, fp32 math, no autograd."""
from __future__ import annotations

import torch

from .runtime import triton


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


if triton is not None:
    import triton.language as tl

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
