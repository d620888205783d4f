"""Triton implicit-GEMM sparse conv (kernels/sparse_conv.py) against the PyTorch references.

On CPU the kernels run in the Triton interpreter (float32, small sizes); on CUDA the ``gpu`` tests run
them at benchmark-like sizes in bfloat16.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first triton import (kernels import it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from d3ds2.sparse import SparseTensor, SubMConv3d  # noqa: E402
from d3ds2.sparse import backend  # noqa: E402
from d3ds2.sparse.gemm import sparse_conv  # noqa: E402
from d3ds2.sparse.kernel_map import submanifold_map, submanifold_table  # noqa: E402
from d3ds2.kernels.sparse_conv import gather_conv_reference, subm_table, submconv, usable  # noqa: E402
from sparse_helpers import random_sparse, shell  # noqa: E402

# The interpreter converts 1-element arrays to loop bounds, which NumPy >= 1.25 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(fn, feats, weight, nbr_or_map, grad_out):
    f = feats.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    y = fn(f, w, nbr_or_map)
    gf, gw = torch.autograd.grad(y, [f, w], grad_out)
    return y.detach(), gf, gw


@pytest.mark.parametrize("cin,cout", [(16, 16), (32, 48), (48, 32)])
def test_submconv_matches_gather_gemm_scatter(gen, cin, cout):
    """Outputs and both gradients equal the native gather-GEMM-scatter path (float32)."""
    x = random_sparse([70, 0, 45], 5, cin, gen, dtype=torch.float32)  # different sizes, one empty sample
    nbr = submanifold_table(x.coords, x.keys, 3)
    kmap = submanifold_map(x.coords, x.keys, 3)
    w = torch.randn(27, cin, cout, generator=gen) / (27 * cin) ** 0.5
    go = torch.randn(x.num_voxels, cout, generator=gen)
    ours = _run(submconv, x.feats, w, nbr, go)
    ref = _run(sparse_conv, x.feats, w, kmap, go)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_table_kernel_matches_torch_builder(gen, kernel_size):
    """The Triton neighbour-table search equals the torch builder, also at the coordinate range's edges."""
    x = random_sparse([90, 0, 40], 5, 1, gen)
    edge = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 65535, 65534, 65535], [0, 65535, 65535, 65535],
                         [1, 0, 65535, 0], [1, 1, 65535, 1], [1, 0, 0, 65535]], dtype=torch.int32)
    y = SparseTensor.from_unsorted(torch.zeros(len(edge), 1), edge)
    for t in (x, y):
        ref = submanifold_table(t.coords, t.keys, kernel_size)
        assert torch.equal(subm_table(t.keys, kernel_size), ref)
        assert torch.equal(ref, submanifold_map(t.coords, t.keys, kernel_size).neighbor_table())
    assert subm_table(x.keys[:0], kernel_size).shape == (kernel_size**3, 0)


def test_isolated_voxels_and_reference(gen):
    """Voxels without neighbours see only the centre weight; the table reference agrees too."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 4, 4, 4], [1, 2, 2, 2], [1, 7, 0, 3]], dtype=torch.int32)
    x = SparseTensor(torch.randn(5, 16, generator=gen), coords)
    nbr = submanifold_table(x.coords, x.keys, 3)
    w = torch.randn(27, 16, 32, generator=gen)
    go = torch.randn(5, 32, generator=gen)
    ours = _run(submconv, x.feats, w, nbr, go)
    ref = _run(gather_conv_reference, x.feats, w, nbr, go)
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 1e-5
    torch.testing.assert_close(ours[0][2:], x.feats[2:] @ w[13], rtol=1e-5, atol=1e-5)


def test_empty_tensor():
    x = SparseTensor(torch.zeros(0, 16), torch.zeros(0, 4, dtype=torch.int32), batch_size=2)
    nbr = submanifold_table(x.coords, x.keys, 3)
    w = torch.randn(27, 16, 16, requires_grad=True)
    f = x.feats.clone().requires_grad_(True)
    y = submconv(f, w, nbr)
    assert y.shape == (0, 16)
    gf, gw = torch.autograd.grad(y.sum(), [f, w])
    assert gf.shape == (0, 16) and torch.equal(gw, torch.zeros_like(w))


def test_native_backend_dispatches_to_triton(gen, monkeypatch):
    """SubMConv3d through the Triton path (forced on here) equals the gather-GEMM-scatter path."""
    x = random_sparse([40, 25], 4, 16, gen, dtype=torch.float32)
    conv = SubMConv3d(16, 32, 3)
    ref_x = x.replace(x.feats.clone().requires_grad_(True))
    ref = conv(ref_x)
    ref_grads = torch.autograd.grad(ref.feats.square().sum(), [ref_x.feats, conv.weight])
    calls = []

    def forced(feats, weight):
        calls.append(feats.shape)
        return True

    monkeypatch.setattr(backend, "triton_subm_ok", forced)
    tri_x = SparseTensor(x.feats.clone().requires_grad_(True), x.coords)
    out = conv(tri_x)
    grads = torch.autograd.grad(out.feats.square().sum(), [tri_x.feats, conv.weight])
    assert calls and ("subm_table", 3, 1) in tri_x.cache
    assert _rel(out.feats, ref.feats) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert _rel(a, b) < 1e-5


def test_dispatch_rule():
    cpu = torch.zeros(4, 16)
    assert not backend.triton_subm_ok(cpu, torch.zeros(16, 16, 3, 3, 3))
    assert usable(cpu) == (os.environ.get("TRITON_INTERPRET") == "1")
    with pytest.raises(ValueError, match="weight must be"):
        submconv(cpu, torch.zeros(27, 8, 16), torch.zeros(27, 4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels", [32, 128])
def test_gpu_bf16_large_shell(channels):
    """bf16 at 263k voxels (a 256³ shell): relative error < 1e-2 against the float32 reference path."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    coords = shell(256, 0.4 * 256).cuda()
    x = SparseTensor(torch.randn(len(coords), channels, device="cuda", generator=g), coords)
    nbr = submanifold_table(x.coords, x.keys, 3)
    kmap = submanifold_map(x.coords, x.keys, 3)
    assert torch.equal(nbr, kmap.neighbor_table())
    w = torch.randn(27, channels, channels, device="cuda", generator=g) / (27 * channels) ** 0.5
    go = torch.randn(len(coords), channels, device="cuda", generator=g)
    ours = _run(submconv, x.feats.bfloat16(), w.bfloat16(), nbr, go.bfloat16())
    ref = _run(sparse_conv, x.feats, w, kmap, go)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert _rel(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_module_autocast_matches_fp32():
    """SubMConv3d under bf16 autocast (Triton path) vs the float32 gather-GEMM-scatter path."""
    coords = shell(128, 0.4 * 128).cuda()
    x = SparseTensor(torch.randn(len(coords), 64, device="cuda"), coords)
    conv = SubMConv3d(64, 64, 3).cuda()
    assert backend.triton_subm_ok(x.feats.bfloat16(), conv.weight)
    kmap = submanifold_map(x.coords, x.keys, 3)
    ref = sparse_conv(x.feats, backend.flat_weight(conv.weight), kmap) + conv.bias
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = conv(x).feats
    assert out.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2
    assert _rel(conv(x).feats, ref) < 1e-5  # float32 runs the kernel with IEEE products
