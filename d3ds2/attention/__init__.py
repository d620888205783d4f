"""Sparse attention: full (per sample), windowed, and spatial sparse attention (SSA)."""
from .full import sparse_cross_attention, sparse_self_attention
from .self_attention import ATTENTION_MODES, GQASelfAttention, build_self_attention
from .ssa import SSAConfig, SSALayout, SpatialSparseAttention, build_ssa_layout, spatial_sparse_attention
from .varlen import varlen_attention
from .window import window_attention

__all__ = [
    "ATTENTION_MODES",
    "GQASelfAttention",
    "build_self_attention",
    "varlen_attention",
    "sparse_self_attention",
    "sparse_cross_attention",
    "window_attention",
    "SSAConfig",
    "SSALayout",
    "SpatialSparseAttention",
    "build_ssa_layout",
    "spatial_sparse_attention",
]
