"""Sparse voxel engine: :class:`SparseTensor` and the ops the models need (see docs/sparse.md)."""
from .backend import available_backends, get_backend, set_backend, submanifold_conv
from .coords import pack_keys
from .nn import (
    SparseActivation,
    SparseConvTranspose3d,
    SparseDownConv3d,
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    SparseUpsample,
    SubMConv3d,
)
from .serialize import Partition, block_sort, curve_order, hilbert_code, window_partition, zorder_code
from .spatial import CHILD_OFFSETS, DownsampleMap, mean_pool, prune, subdivide, unpool
from .tensor import SparseTensor

__all__ = [
    "SparseTensor", "pack_keys",
    "available_backends", "get_backend", "set_backend", "submanifold_conv",
    "SubMConv3d", "SparseDownConv3d", "SparseConvTranspose3d", "SparseDownsample", "SparseUpsample",
    "SparseSubdivide", "SparseLinear", "SparseLayerNorm", "SparseGroupNorm",
    "SparseActivation", "SparseSiLU",
    "Partition", "block_sort", "window_partition", "curve_order", "zorder_code", "hilbert_code",
    "CHILD_OFFSETS", "DownsampleMap", "mean_pool", "prune", "subdivide", "unpool",
]
