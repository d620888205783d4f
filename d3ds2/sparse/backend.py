"""Sparse convolution backends: ``native`` (pure PyTorch, default everywhere), ``spconv`` when importable.

torchsparse has no adapter: it is not on PyPI and does not build on the machines this project tests on;
its checkpoints are read through the weight-layout converter instead.

Every backend takes the same weights, laid out as in ``torch.nn.Conv3d``: ``[Cout, Cin, kx, ky, kz]``
with cross-correlation semantics (output p reads input p + (i - k//2) for weight index i), so a state
dict moves between backends and machines unchanged. Choose with :func:`set_backend` or the environment
variable ``D3DS2_SPARSE_BACKEND``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from .gemm import sparse_conv
from .kernel_map import submanifold_map, submanifold_table
from .tensor import SparseTensor

BACKENDS = ("native", "spconv")
_state = {"name": os.environ.get("D3DS2_SPARSE_BACKEND", "native")}


def available_backends() -> list[str]:
    """Backends whose packages import on this machine."""
    return [b for b in BACKENDS if b == "native" or importlib.util.find_spec(b) is not None]


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r}; choose one of {BACKENDS}")
    if name not in available_backends():
        raise ImportError(f"sparse backend {name!r} is not installed here; available: {available_backends()}")
    _state["name"] = name


def get_backend() -> str:
    name = _state["name"]
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend {name!r} (from D3DS2_SPARSE_BACKEND); choose one of {BACKENDS}")
    return name


def flat_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, k, k, k] -> [k³, Cin, Cout] in kernel-offset order."""
    cout, cin = weight.shape[:2]
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, cin, cout)


def triton_subm_ok(feats: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the native backend runs a submanifold conv through the Triton implicit-GEMM kernel.

    On CUDA, for float16 / bfloat16 / float32 with Cin and Cout multiples of 16 (16-byte rows, full
    matrix-unit tiles); everything else, and every CPU tensor, takes the gather-GEMM-scatter path.
    """
    if not feats.is_cuda or feats.shape[1] % 16 or weight.shape[0] % 16:
        return False
    from d3ds2.kernels.sparse_conv import usable

    return usable(feats)


def _native_subm(x: SparseTensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    k = weight.shape[2]
    if triton_subm_ok(x.feats, weight):
        from d3ds2.kernels.sparse_conv import submconv

        nbr = x.cached(("subm_table", k, dilation), lambda: submanifold_table(x.coords, x.keys, k, dilation))
        return submconv(x.feats, flat_weight(weight).to(x.feats.dtype), nbr)
    kmap = x.cached(("subm", k, dilation), lambda: submanifold_map(x.coords, x.keys, k, dilation))
    return sparse_conv(x.feats, flat_weight(weight), kmap)


def _spconv_subm(x: SparseTensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    import spconv.pytorch as spconv
    from spconv.pytorch import functional as Fsp  # noqa: F401  (ensures ops are registered)

    k = weight.shape[2]
    shape = (x.coords[:, 1:].amax(0) + k).tolist() if x.num_voxels else [k, k, k]
    key = ("spconv_indices", k, dilation)
    st = spconv.SparseConvTensor(x.feats, x.coords, shape, x.batch_size)
    if key in x.cache:
        st.indice_dict = x.cache[key]
    conv = x.cached(
        ("spconv_module", k, dilation, weight.shape[0], weight.shape[1]),
        lambda: spconv.SubMConv3d(weight.shape[1], weight.shape[0], k, dilation=dilation, bias=False, indice_key="subm"),
    ).to(x.device)
    w = weight.permute(0, 2, 3, 4, 1).contiguous()  # spconv's default [Cout, kx, ky, kz, Cin]
    out = torch.func.functional_call(conv, {"weight": w}, (st,))
    x.cache[key] = out.indice_dict
    return out.features


_SUBM: dict[str, Callable[[SparseTensor, torch.Tensor, int], torch.Tensor]] = {
    "native": _native_subm,
    "spconv": _spconv_subm,
}


def submanifold_conv(x: SparseTensor, weight: torch.Tensor, dilation: int = 1, backend: str | None = None) -> torch.Tensor:
    """Submanifold conv feats [N, Cout] of ``x`` with an odd kernel ``weight`` [Cout, Cin, k, k, k]."""
    name = backend or get_backend()
    if name not in _SUBM:
        raise ValueError(f"unknown sparse backend {name!r}; choose one of {BACKENDS}")
    return _SUBM[name](x, weight, dilation)
