"""``nn.Module`` wrappers of the sparse ops; each takes and returns a :class:`SparseTensor`.

Weights of every convolution follow ``torch.nn.Conv3d`` (``weight [Cout, Cin, k, k, k]``, ``bias [Cout]``)
and ``ConvTranspose3d`` (``weight [Cin, Cout, k, k, k]``) whatever the backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import flat_weight, submanifold_conv
from .gemm import sparse_conv
from .spatial import DownsampleMap, downsample_map, mean_pool, subdivide, unpool
from .tensor import SparseTensor

UPSAMPLE_KEY = "upsample_map"  # cache key, on a downsampled tensor, of the map back to its fine sites


def _autocast_feats(x: SparseTensor) -> torch.Tensor:
    """Feats in the autocast dtype when autocast is on (custom autograd ops are not autocast-aware)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.feats.is_floating_point():
        return x.feats.to(torch.get_autocast_dtype(dev))
    return x.feats


class _ConvBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, transposed: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        shape = (in_channels, out_channels) if transposed else (out_channels, in_channels)
        self.weight = nn.Parameter(torch.empty(*shape, kernel_size, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The default init of ``nn.Conv3d`` (kaiming-uniform with a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**3
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class SubMConv3d(_ConvBase):
    """Submanifold convolution: output sites = input sites; odd kernel (1 or 3 typically)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, dilation: int = 1) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"SubMConv3d needs an odd kernel_size, got {kernel_size}")
        self.dilation = dilation
        super().__init__(in_channels, out_channels, kernel_size, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        feats = _autocast_feats(x)
        if self.kernel_size == 1:
            out = feats @ self.weight.to(feats.dtype).view(self.out_channels, self.in_channels).t()
        else:
            out = submanifold_conv(x.replace(feats), self.weight.to(feats.dtype), self.dilation)
        return x.replace(self._add_bias(out))


class SparseDownConv3d(_ConvBase):
    """Strided downsampling conv, kernel = stride = ``factor``: parent q = sum_c W[c] @ child (factor·q + c)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, bias: bool = True) -> None:
        self.factor = factor
        super().__init__(in_channels, out_channels, factor, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        pc, dmap = downsample_map(x, self.factor)
        feats = _autocast_feats(x)
        out = sparse_conv(feats, flat_weight(self.weight.to(feats.dtype)), dmap.children)
        coarse = SparseTensor(self._add_bias(out), pc, x.batch_size, check=False)
        coarse.cache[(UPSAMPLE_KEY, self.factor)] = dmap
        return coarse


class SparseConvTranspose3d(_ConvBase):
    """Transposed strided conv back onto the fine sites a previous downsample came from."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, bias: bool = True) -> None:
        self.factor = factor
        super().__init__(in_channels, out_channels, factor, bias, transposed=True)

    def forward(self, x: SparseTensor, dmap: DownsampleMap | None = None) -> SparseTensor:
        dmap = dmap or _upsample_map(x, self.factor)
        feats = _autocast_feats(x)
        w = self.weight.to(feats.dtype).permute(2, 3, 4, 0, 1).reshape(-1, self.in_channels, self.out_channels)
        out = sparse_conv(feats, w, dmap.children.transposed(dmap.fine_coords.shape[0]))
        return SparseTensor(self._add_bias(out), dmap.fine_coords, dmap.fine_batch_size, check=False)


def _upsample_map(x: SparseTensor, factor: int) -> DownsampleMap:
    key = (UPSAMPLE_KEY, factor)
    if key not in x.cache:
        raise ValueError(
            "this tensor was not produced by a sparse downsample, so its fine sites are unknown; "
            "pass the DownsampleMap explicitly or use SparseSubdivide to create all children"
        )
    return x.cache[key]


class SparseDownsample(nn.Module):
    """Mean pooling over factor³ cells; the output remembers the fine sites for :class:`SparseUpsample`."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        coarse, dmap = mean_pool(x, self.factor)
        coarse.cache[(UPSAMPLE_KEY, self.factor)] = dmap
        return coarse


class SparseUpsample(nn.Module):
    """Inverse of :class:`SparseDownsample`: back to the remembered fine sites, copying parent feats."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor, dmap: DownsampleMap | None = None) -> SparseTensor:
        return unpool(x, dmap or _upsample_map(x, self.factor))


class SparseSubdivide(nn.Module):
    """Every voxel -> its 8 children at twice the resolution (see ``spatial.CHILD_OFFSETS``)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return subdivide(x)


class SparseLinear(nn.Linear):
    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel, computed in float32."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        out = F.layer_norm(x.feats.float(), self.normalized_shape, w, b, self.eps)
        return x.replace(out.to(x.dtype))


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics over all voxels of one sample and the channels of a group (float32).

    Each sample's rows (contiguous in canonical order) go through the native ``torch.group_norm`` (no check
    against one value per group: a one-voxel sample normalises to the bias, as the statistics say) as a
    [1, C, n_b] tensor: its backward is a reduction kernel, where gathering per-sample statistics back
    to the voxels by sample index had a backward (a sorting index_put with ~n_b duplicates of each sample
    row) that took 89 % of a VAE training step on an H200 (docs/benchmarks.md).
    """

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        f = x.feats.float()
        w = self.weight.float() if self.affine else None
        b = self.bias.float() if self.affine else None
        rows = x.cached("row_slices", lambda: x.layout)  # one host sync per voxel set, shared by its layers
        parts = [f[s] if s.stop == s.start else
                 torch.group_norm(f[s].t().unsqueeze(0), self.num_groups, w, b, self.eps)[0].t() for s in rows]
        out = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        return x.replace(out.to(x.dtype))


class SparseActivation(nn.Module):
    """Apply a feature-wise module (``nn.SiLU()``, ``nn.GELU('tanh')``...) to the feats."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(self.act(x.feats))


def SparseSiLU() -> SparseActivation:
    return SparseActivation(nn.SiLU())
