"""Gather-GEMM-scatter: the native sparse convolution compute over a :class:`KernelMap`.

``out[o] = sum_k sum_{(i, o) in pairs_k} feats[i] @ W[k]`` with W [K, Cin, Cout]. The custom backward
recomputes the gathers instead of saving them, so training memory is O(N·C) rather than O(K·N·C).
Half-precision inputs accumulate in float32.
"""
from __future__ import annotations

import torch

from .kernel_map import KernelMap


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gemm_scatter(src: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, num_out: int, transpose: bool) -> torch.Tensor:
    """sum over offsets of scatter(out_idx, src[in_idx] @ W_k) (or the reverse direction if transpose)."""
    out = src.new_zeros(num_out, weight.shape[1] if transpose else weight.shape[2], dtype=_accum_dtype(src.dtype))
    start = 0
    for k, n in enumerate(kmap.splits):
        w = weight[k].t() if transpose else weight[k]
        if k == kmap.identity:
            out += (src @ w).to(out.dtype)
        elif n:
            i_idx = kmap.in_idx[start : start + n]
            o_idx = kmap.out_idx[start : start + n]
            g, s = (o_idx, i_idx) if transpose else (i_idx, o_idx)
            out.index_add_(0, s, (src.index_select(0, g) @ w).to(out.dtype))
        start += n
    return out.to(src.dtype)


class _SparseConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        return _gemm_scatter(feats, weight, kmap, kmap.num_out, transpose=False)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_feats = _gemm_scatter(grad_out, weight, kmap, feats.shape[0], transpose=True)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight, dtype=_accum_dtype(weight.dtype))
            start = 0
            for k, n in enumerate(kmap.splits):
                if k == kmap.identity:
                    grad_weight[k] = (feats.t() @ grad_out).to(grad_weight.dtype)
                elif n:
                    i_idx = kmap.in_idx[start : start + n]
                    o_idx = kmap.out_idx[start : start + n]
                    grad_weight[k] = (feats.index_select(0, i_idx).t() @ grad_out.index_select(0, o_idx)).to(grad_weight.dtype)
                start += n
            grad_weight = grad_weight.to(weight.dtype)
        return grad_feats, grad_weight, None


def sparse_conv(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Apply weight [K, Cin, Cout] over a kernel map; feats [N_in, Cin] -> [num_out, Cout]."""
    if feats.shape[1] != weight.shape[1]:
        raise ValueError(f"feats have {feats.shape[1]} channels, the convolution expects {weight.shape[1]}")
    if weight.dtype != feats.dtype:
        weight = weight.to(feats.dtype)
    return _SparseConvFunction.apply(feats.contiguous(), weight, kmap)
