"""Pure-PyTorch reference of span attention: the definition (float64-checkable, differentiable)."""
from __future__ import annotations

import torch


def span_attention_reference(q, k, v, idx, span_offsets, scale=None):
    """Reference of :func:`span_attention`: gathers each query's keys (padded), exact softmax.

    Memory O(Nq * Hkv * TOPK * max_span_len * D): meant for small inputs or a subset of queries.
    Returns (o [Nq, Hq, D], lse [Nq, Hq]).
    """
    nq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    idx = idx.long()
    hi = idx.shape[1]
    off = span_offsets.long()
    valid_span = idx >= 0
    safe = idx.clamp(min=0)
    start = off[safe]
    length = torch.where(valid_span, off[safe + 1] - start, 0)
    lmax = max(int(length.max().item()) if length.numel() else 0, 1)
    ar = torch.arange(lmax, device=q.device)
    pos = (start[..., None] + ar).clamp(max=max(k.shape[0] - 1, 0))  # [Nq, Hi, TOPK, L]
    valid = ar < length[..., None]
    pos = pos.flatten(2).expand(nq, hkv, -1) if hi == 1 else pos.flatten(2)
    valid = valid.flatten(2).expand(nq, hkv, -1) if hi == 1 else valid.flatten(2)
    heads = torch.arange(hkv, device=q.device).view(1, hkv, 1)
    kg = k[pos, heads]  # [Nq, Hkv, K, D]
    vg = v[pos, heads]
    s = torch.einsum("nhgd,nhkd->nhgk", q.view(nq, hkv, g, d), kg) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.where(valid[:, :, None, :], p, 0.0)
    o = torch.einsum("nhgk,nhkd->nhgd", p, vg)
    return o.reshape(nq, hq, d), lse.reshape(nq, hq)
