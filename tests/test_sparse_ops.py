"""Every sparse op against a dense PyTorch reference, forward and gradients, on fresh random batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d3ds2.sparse import (
    CHILD_OFFSETS,
    SparseConvTranspose3d,
    SparseDownConv3d,
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseSubdivide,
    SparseTensor,
    SparseUpsample,
    SubMConv3d,
    prune,
    submanifold_conv,
)
from sparse_helpers import random_sparse, read_dense, to_dense

SIZES = [37, 0, 90]  # batch > 1, different sizes, one empty sample
RES = 8


def _leaf(x: SparseTensor) -> SparseTensor:
    return x.replace(x.feats.clone().requires_grad_(True))


@pytest.mark.parametrize("kernel_size,dilation,bias", [(3, 1, True), (3, 2, False), (1, 1, True)])
def test_submconv_matches_dense_conv3d(gen, kernel_size, dilation, bias):
    x = _leaf(random_sparse(SIZES, RES, 4, gen))
    conv = SubMConv3d(4, 5, kernel_size, bias=bias, dilation=dilation).double()
    y = conv(x)
    assert torch.equal(y.coords, x.coords)

    xd = to_dense(x, RES)
    ref = read_dense(F.conv3d(xd, conv.weight, conv.bias, padding=dilation * (kernel_size // 2), dilation=dilation), x.coords)
    torch.testing.assert_close(y.feats, ref)

    g = torch.randn_like(ref)
    grads = torch.autograd.grad((y.feats * g).sum(), [x.feats, conv.weight])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x.feats, conv.weight])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_submconv_gradcheck(gen):
    x = _leaf(random_sparse([12, 7], 4, 2, gen))
    conv = SubMConv3d(2, 3, bias=False).double()
    assert torch.autograd.gradcheck(lambda f, w: submanifold_conv(x.replace(f), w), (x.feats, conv.weight))


def test_down_conv_and_transpose_match_dense(gen):
    x = _leaf(random_sparse(SIZES, RES, 3, gen))
    down = SparseDownConv3d(3, 4).double()
    y = down(x)
    ref = F.conv3d(to_dense(x, RES), down.weight, down.bias, stride=2)
    torch.testing.assert_close(y.feats, read_dense(ref, y.coords))
    # the parents are exactly the cells that hold a voxel
    parents = torch.cat([x.coords[:, :1], x.coords[:, 1:] // 2], 1)
    assert torch.equal(torch.unique(parents, dim=0), y.coords)

    up = SparseConvTranspose3d(4, 2).double()
    z = up(y)
    assert torch.equal(z.coords, x.coords)
    ref_up = read_dense(F.conv_transpose3d(to_dense(y, RES // 2), up.weight, up.bias, stride=2), x.coords)
    torch.testing.assert_close(z.feats, ref_up)

    g = torch.randn_like(z.feats)
    got = torch.autograd.grad((z.feats * g).sum(), [x.feats, down.weight, up.weight])
    yd = F.conv3d(to_dense(x, RES), down.weight, down.bias, stride=2)
    mask = to_dense(y.replace(torch.ones(y.num_voxels, 1, dtype=torch.float64)), RES // 2)
    zd = read_dense(F.conv_transpose3d(yd * mask, up.weight, up.bias, stride=2), x.coords)
    want = torch.autograd.grad((zd * g).sum(), [x.feats, down.weight, up.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_mean_pool_and_unpool(gen):
    x = _leaf(random_sparse(SIZES, RES, 3, gen))
    y = SparseDownsample(2)(x)
    xd = to_dense(x, RES)
    occ = to_dense(x.replace(torch.ones(x.num_voxels, 1, dtype=torch.float64)), RES)
    ref = F.avg_pool3d(xd, 2) / F.avg_pool3d(occ, 2).clamp_min(1e-12)
    torch.testing.assert_close(y.feats, read_dense(ref, y.coords))

    z = SparseUpsample(2)(y)
    assert torch.equal(z.coords, x.coords)
    torch.testing.assert_close(z.feats, read_dense(ref.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4), x.coords))
    g = torch.randn_like(z.feats)
    (gx,) = torch.autograd.grad((z.feats * g).sum(), [x.feats])
    refz = read_dense((F.avg_pool3d(xd, 2) / F.avg_pool3d(occ, 2).clamp_min(1e-12)).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4), x.coords)
    (gref,) = torch.autograd.grad((refz * g).sum(), [x.feats])
    torch.testing.assert_close(gx, gref)


def test_subdivide_child_order_and_values(gen):
    x = _leaf(random_sparse([20, 0, 64], 4, 2, gen))
    y = SparseSubdivide()(x)
    assert y.num_voxels == 8 * x.num_voxels
    ref = to_dense(x, 4).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(y.feats, read_dense(ref, y.coords))
    SparseTensor(y.feats, y.coords)  # canonical order: validation passes
    parent = y.cache["subdivide_parent"]
    child = (y.coords[:, 1:] - 2 * x.coords[parent, 1:]).long()
    assert set(map(tuple, child.tolist())) == set(map(tuple, CHILD_OFFSETS.tolist()))
    assert CHILD_OFFSETS[1].tolist() == [0, 0, 1] and CHILD_OFFSETS[4].tolist() == [1, 0, 0]


def test_prune_keeps_masked_rows(gen):
    x = random_sparse(SIZES, RES, 2, gen)
    keep = torch.rand(x.num_voxels, generator=gen) > 0.5
    y = prune(x, keep)
    torch.testing.assert_close(y.feats, x.feats[keep])
    assert torch.equal(y.coords, x.coords[keep])
    with pytest.raises(ValueError, match="bool mask"):
        prune(x, keep.int())


def _group_norm_float64(feats, layout, groups, weight, bias, eps):
    """Per-sample GroupNorm written out in float64: mean / biased variance over a sample's voxels x group."""
    out = torch.empty_like(feats, dtype=torch.float64)
    for s in layout:
        if s.stop == s.start:
            continue
        f = feats[s].double().reshape(s.stop - s.start, groups, -1)
        mean = f.mean(dim=(0, 2), keepdim=True)
        var = f.var(dim=(0, 2), unbiased=False, keepdim=True)
        out[s] = ((f - mean) / torch.sqrt(var + eps)).reshape(s.stop - s.start, -1)
    return out * weight.double() + bias.double()


def test_group_norm_is_per_sample(gen):
    x = random_sparse(SIZES, RES, 8, gen).to(torch.float32)
    assert any(s.stop == s.start for s in x.layout)  # an empty sample is part of the case
    gn = SparseGroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    feats = x.feats.clone().requires_grad_()
    y = gn(x.replace(feats))
    ref_feats = x.feats.double().requires_grad_()
    w, b = gn.weight.detach().double().requires_grad_(), gn.bias.detach().double().requires_grad_()
    ref = _group_norm_float64(ref_feats, x.layout, 4, w, b, gn.eps)
    torch.testing.assert_close(y.feats.double(), ref, rtol=1e-5, atol=1e-5)
    up = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (y.feats.double() * up).sum().backward()
    (ref * up).sum().backward()
    for got, want in ((feats.grad, ref_feats.grad), (gn.weight.grad, w.grad), (gn.bias.grad, b.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_layer_norm_fp32_inside(gen):
    x = random_sparse(SIZES, RES, 16, gen).to(torch.bfloat16)
    ln = SparseLayerNorm(16, elementwise_affine=False, eps=1e-6)
    y = ln(x)
    assert y.dtype == torch.bfloat16
    ref = F.layer_norm(x.feats.float(), (16,), eps=1e-6)
    torch.testing.assert_close(y.feats.float(), ref, rtol=1e-2, atol=1e-2)
