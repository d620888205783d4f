"""Variable-length multi-head attention over packed sequences (cu_seqlens), with grouped KV heads.

Kernels (``kernel=``): 'flash' = torch's FlashAttention-2 varlen kernel (``torch.nn.attention.varlen``; CUDA,
fp16/bf16); 'span' = the project's Triton span kernel with spans = segments (:mod:`d3ds2.kernels.span_attention`: the
q heads sharing a KV head go through one tile, so K/V are read once per group); 'torch' = a padded
``scaled_dot_product_attention`` (any device and dtype: CPU, float32/64, tests). 'auto' = flash where it
applies, else torch.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from d3ds2.fallbacks import warn_fallback
from d3ds2.kernels.runtime import triton_usable
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.span_plan import default_block_m, plan_spans

try:
    from torch.nn.attention.varlen import varlen_attn as _flash_varlen

    _FLASH_GQA = "enable_gqa" in inspect.signature(_flash_varlen).parameters
except ImportError:  # torch < 2.10
    _flash_varlen = None
    _FLASH_GQA = False


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _span_unusable(q: torch.Tensor) -> str | None:
    """Why the span kernel cannot take q, or None where it can."""
    if not triton_usable(q):
        return f"Triton does not run on {q.device.type} tensors here"
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"head dim {d} is not a power of two >= 16"
    return None


def _flash_unusable(q: torch.Tensor) -> str | None:
    """Why FlashAttention cannot take q, or None where it can."""
    if _flash_varlen is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10 has)"
    if not q.is_cuda:
        return "it needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16/bfloat16 inputs, got {q.dtype}"
    return None


def _segments(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id and position inside the segment of each of ``total`` packed rows."""
    lens = cu.diff().long()
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)
    pos = torch.arange(total, device=cu.device) - cu.long()[seg]
    return seg, pos


def _padded_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    s = cu_q.numel() - 1
    seg_q, pos_q = _segments(cu_q, q.shape[0])
    seg_k, pos_k = _segments(cu_k, k.shape[0])
    qp = q.new_zeros(s, max_q, *q.shape[1:])
    kp = k.new_zeros(s, max_k, *k.shape[1:])
    vp = v.new_zeros(s, max_k, *v.shape[1:])
    qp[seg_q, pos_q] = q
    kp[seg_k, pos_k] = k
    vp[seg_k, pos_k] = v
    valid = torch.arange(max_k, device=q.device) < cu_k.diff().view(-1, 1)  # [S, max_k]
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=valid[:, None, None, :], scale=scale
    )
    return out.transpose(1, 2)[seg_q, pos_q]


def _span_attention(q, k, v, cu_q, cu_k, scale):
    seg, _ = _segments(cu_q, q.shape[0])  # each query selects the one span of its segment
    plan = plan_spans(seg.to(torch.int32).view(-1, 1, 1), cu_k, default_block_m(q.shape[1] // k.shape[1], 1),
                      query_offsets=cu_q, check_unique=False)
    return span_attention(q, k, v, plan, scale, backend="triton")[0]


VARLEN_KERNELS = ("auto", "flash", "span", "torch")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of packed queries to the keys of the same segment (no mask across segments).

    q: [Nq, Hq, D]; k, v: [Nk, Hkv, D] with Hq a multiple of Hkv (GQA); cu_seqlens_*: [S + 1] int
    segment starts. Every segment with queries must have at least one key. ``kernel``: one of
    VARLEN_KERNELS (module docstring); where it cannot run, 'span' falls back to 'flash' (head dims that
    are not a power of two >= 16) and 'flash' to 'torch' (CPU tensors, float32/64), with a
    :class:`~d3ds2.fallbacks.SlowPathWarning` once (not for 'auto' on the CPU, where 'torch' is the only
    path). Returns [Nq, Hq, D].
    """
    if kernel not in VARLEN_KERNELS:
        raise ValueError(f"varlen_attention: kernel must be one of {VARLEN_KERNELS}, got {kernel!r}")
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of segments")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] == 0:
        return q.new_zeros(q.shape[0], hq, v.shape[-1])
    if kernel == "span":
        why = _span_unusable(q)
        if why is None:
            return _span_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
        warn_fallback("varlen-span", f"varlen_attention(kernel='span'): the span kernel cannot run ({why}); "
                                     f"FlashAttention or the padded PyTorch attention runs instead. Fix: CUDA "
                                     f"tensors (or TRITON_INTERPRET=1) with a power-of-two head dim >= 16")
    flash_why = _flash_unusable(q) if kernel != "torch" else "kernel='torch'"
    if kernel != "torch" and flash_why is not None and (q.is_cuda or kernel == "flash"):
        warn_fallback("varlen-flash", f"varlen_attention(kernel={kernel!r}): FlashAttention cannot run ({flash_why}); "
                                      f"the padded PyTorch attention runs instead (slower, memory grows with the "
                                      f"longest segment squared). Fix: bf16/fp16 CUDA inputs (autocast) and "
                                      f"torch >= 2.10, or kernel='span'")
    if flash_why is None:
        kw = {"enable_gqa": True} if _FLASH_GQA else {}
        if not _FLASH_GQA:
            k, v = _repeat_kv(k, hq // hkv), _repeat_kv(v, hq // hkv)
        return _flash_varlen(
            q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k, scale=scale, **kw
        )
    k, v = _repeat_kv(k, hq // hkv), _repeat_kv(v, hq // hkv)
    return _padded_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
