"""Layers shared by the alignment encoders, with the parameter names of timm's ViT / EVA blocks (the names the
released ULIP-2, OpenShape, Uni3D and EVA-CLIP checkpoints use or map onto) and of PointBERT's mini-PointNet.

- :class:`Block`: pre-norm (ULIP-2, OpenShape, Uni3D) or post-norm (EVA02-E) transformer block; attention with a
  fused ``qkv`` (optionally with timm EVA's ``q_bias`` / ``v_bias``) or separate ``q_proj`` / ``k_proj`` /
  ``v_proj`` (EVA02-L); GELU ``Mlp`` or ``SwiGLU`` with its sub-LN; no rotary embedding (none of these use one).
- :class:`MiniPointNet`: PointBERT's per-patch encoder (``first_conv`` / ``second_conv``), used by ULIP-2 and
  Uni3D, its BatchNorms always on their running statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6  # timm EVA / EVA-CLIP LayerNorm eps (ULIP-2 and OpenShape use torch's 1e-5)


class Attention(nn.Module):
    """Multi-head self-attention, scale head_dim^-0.5. ``fused_qkv``: ``qkv.weight`` [3D, D], with ``qkv_bias``
    a ``qkv.bias`` [3D] (timm ViT), else ``q_bias`` / ``v_bias`` [D] with ``qv_bias`` (timm EVA: the k bias is
    0); not fused: ``q_proj`` (bias), ``k_proj`` (no bias), ``v_proj`` (bias). Output ``proj`` (bias)."""

    def __init__(self, dim: int, num_heads: int, fused_qkv: bool = True, qv_bias: bool = True,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.fused_qkv = num_heads, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias and not qkv_bias else None
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias and not qkv_bias else None
        else:
            self.q_proj = nn.Linear(dim, dim, bias=True)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, N, D] -> q, k, v each [B, heads, N, D / heads]."""
        b, n, d = x.shape
        if self.fused_qkv:
            bias = self.qkv.bias if self.q_bias is None else torch.cat(
                [self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            q, k, v = F.linear(x, self.qkv.weight, bias).split(d, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return tuple(t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(*self.project_qkv(x))
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """timm ``SwiGLU`` with its sub-LN: fc2(norm(silu(fc1_g(x)) * fc1_x(x)))."""

    def __init__(self, dim: int, hidden: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.fc1_g, self.fc1_x = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class Block(nn.Module):
    """Transformer block, timm names (``norm1``, ``attn``, ``norm2``, ``mlp``): pre-norm ``x + attn(norm1(x))``,
    or with ``post_norm`` (timm ``EvaBlockPostNorm``) ``x + norm1(attn(x))``; no layer scale, no drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, fused_qkv: bool = True, qv_bias: bool = True,
                 swiglu: bool = False, post_norm: bool = False, eps: float = LN_EPS, qkv_bias: bool = False) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, fused_qkv, qv_bias, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden, eps) if swiglu else Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FrozenBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that always normalises with its running statistics (the encoders are evaluated in eval mode,
    whatever mode their parent is in); same parameters and buffers as ``nn.BatchNorm1d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class MiniPointNet(nn.Module):
    """PointBERT's per-patch encoder: patches [B, G, K, C] -> [B, G, out_dim]. ``first_conv`` = Conv1d(C, w1) -
    BN - ReLU - Conv1d(w1, w2), max over the patch, concat [max, per point], ``second_conv`` = Conv1d(2 w2, w3) -
    BN - ReLU - Conv1d(w3, out_dim), max over the patch."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int], out_dim: int) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.first_conv = nn.Sequential(nn.Conv1d(in_channels, w1, 1), FrozenBatchNorm1d(w1), nn.ReLU(),
                                        nn.Conv1d(w1, w2, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(2 * w2, w3, 1), FrozenBatchNorm1d(w3), nn.ReLU(),
                                         nn.Conv1d(w3, out_dim, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, g, k, c = patches.shape
        f = self.first_conv(patches.reshape(b * g, k, c).transpose(1, 2))  # [BG, w2, K]
        f = torch.cat([f.amax(2, keepdim=True).expand(-1, -1, k), f], 1)
        return self.second_conv(f).amax(2).reshape(b, g, -1)
