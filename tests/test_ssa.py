"""SSA: layout, functional SSA (Triton, the interpreter on CPU) against the PyTorch path, module against a
brute-force dense definition written from coords alone (float64). The span kernels and the top-k scoring have
their own tests (test_span_attention.py, test_ssa_topk.py)."""
from __future__ import annotations

import pytest
import torch

from d3ds2.attention.ssa import (SSAConfig, SpatialSparseAttention, block_mean, build_ssa_layout,
                                 compressed_attention, spatial_sparse_attention)
from d3ds2.kernels.span_attention import span_attention
from d3ds2.kernels.ssa_topk import score_topk, shared_score_topk
from d3ds2.sparse import SparseTensor
from sparse_helpers import assert_rel_close, ssa_coords


@pytest.mark.parametrize("m_cmp,m_slc", [(4, 4), (2, 4)])
def test_layout_groups_blocks_and_sub_blocks(gen, m_cmp, m_slc):
    c = ssa_coords(gen)
    lay = build_ssa_layout(c, m_cmp, m_slc)
    s = lay.coords.long()
    assert torch.equal(c[lay.perm], lay.coords) and torch.equal(lay.coords[lay.inverse], c)
    # samples contiguous, in order
    assert bool((s[1:, 0] >= s[:-1, 0]).all())
    # every selection block / compression block is one contiguous run with constant block coords
    for offs, size in ((lay.block_offsets, m_slc), (lay.cmp_offsets, m_cmp)):
        cell = torch.cat([s[:, :1], s[:, 1:] // size], 1)
        start = offs[:-1].long()
        seg = torch.repeat_interleave(torch.arange(len(start)), (offs[1:] - offs[:-1]).long())
        assert torch.equal(cell, cell[start][seg])
        assert bool((cell[start][1:] != cell[start][:-1]).any(1).all())
    # slots: each compressed token sits in its selection block's slot table exactly once
    occupied = lay.slots[lay.slots >= 0]
    assert torch.equal(occupied.sort().values, torch.arange(lay.cmp_counts.numel(), dtype=torch.int32))
    blk_of_cmp = lay.block_of_token[lay.cmp_offsets[:-1].long()]
    rows = torch.nonzero(lay.slots >= 0)[:, 0]
    assert torch.equal(blk_of_cmp[lay.slots[lay.slots >= 0].long()].long(), rows)


CONFIGS = [
    SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=3),
    SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=5, window_shift=2),
    SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2, shared_topk=True),
]


def _selection_is_clear(q, kc, vc, lay, cfg, margin=2e-6) -> bool:
    """Whether every (query, KV head)'s float64 top-k is unambiguous: its k-th block score beats the
    next one by more than ``margin`` (fp32 kernels may swap blocks closer than that)."""
    q, kc = q.double(), kc.double()
    _, lse = compressed_attention(q, kc, vc.double(), lay, backend="torch")
    if cfg.shared_topk:
        _, val = shared_score_topk(q, kc, lse, lay.cmp_offsets, lay.sample_of_cmp, lay.sample_block_offsets,
                                   lay.slots, lay.block_of_cmp, cfg.topk + 1, backend="torch")
    else:
        _, val = score_topk(q, kc, lse, lay.sample_of_token, lay.sample_block_offsets, lay.block_of_cmp,
                            cfg.topk + 1, chunks=lay.score_chunks(), backend="torch")
    runner_up = val[..., -1] >= 0  # a (k+1)-th block exists
    return bool(((val[..., -2] - val[..., -1])[runner_up] > margin).all())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_functional_ssa_triton_matches_torch(gen, cfg):
    for _ in range(10):  # fresh inputs until no block scores are near-tied at the top-k boundary
        lay = build_ssa_layout(ssa_coords(gen), cfg.m_cmp, cfg.m_slc)
        n, hq, hkv, d = lay.num_tokens, 4, 2, 16
        q = torch.randn(n, hq, d, generator=gen)
        k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
        kc = block_mean(k.view(n, -1), lay).view(-1, hkv, d)
        vc = block_mean(v.view(n, -1), lay).view(-1, hkv, d)
        if _selection_is_clear(q, kc, vc, lay, cfg):
            break
    else:
        pytest.fail("10 draws in a row had near-tied block scores; the margin or the sizes need a look")
    gates = torch.rand(n, 3, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, kc, vc, gates)]
    out, (*_, idx) = spatial_sparse_attention(*leaves, lay, cfg, return_branches=True)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, kc, vc, gates)]
    ref_cfg = SSAConfig(**{**cfg.__dict__, "backend": "torch"})
    ref, (*_, idx_ref) = spatial_sparse_attention(*ref_leaves, lay, ref_cfg, return_branches=True)
    assert torch.equal(idx.sort(-1).values, idx_ref.sort(-1).values)  # near-ties were drawn away above
    assert_rel_close(out, ref)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    ref.backward(g.double())
    for a, b in zip(leaves, ref_leaves):
        assert_rel_close(a.grad, b.grad)


def test_triton_ssa_memory_design(gen):
    """The Triton path saves q as its only [N, Hq, D] tensor (plus k/v, compressed k/v, gates and two LSEs);
    the forward allocates the three branch outputs and the output, the backward only dQ and the
    recomputed window output (no gated dO copies, no zero gradients for the inspection outputs). Head dim 32:
    the backward's folded-column buffers are [N, Hq, 16], which head dim 16 would count as activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountActivations(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.made = shape, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made = func.overloadpacket in (torch.ops.aten.empty_like, torch.ops.aten.empty, torch.ops.aten.zeros,
                                           torch.ops.aten.zeros_like, torch.ops.aten.empty_strided,
                                           torch.ops.aten.new_zeros, torch.ops.aten.new_empty, torch.ops.aten.mul,
                                           torch.ops.aten.add, torch.ops.aten.clone, torch.ops.aten.index)
            if made and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
                self.made.append(func.overloadpacket.__name__)
            return out

    cfg = SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=3, window_shift=2)
    lay = build_ssa_layout(ssa_coords(gen), cfg.m_cmp, cfg.m_slc)
    n, hq, hkv, d = lay.num_tokens, 4, 2, 32
    q = torch.randn(n, hq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(n, hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    kc = block_mean(k.detach().view(n, -1), lay).view(-1, hkv, d)
    vc = block_mean(v.detach().view(n, -1), lay).view(-1, hkv, d)
    gates = torch.rand(n, 3, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with CountActivations(tuple(q.shape)) as fwd:
            out = spatial_sparse_attention(q, k, v, kc, vc, gates, lay, cfg)
    assert [tuple(t.shape) for t in saved].count(tuple(q.shape)) == 1
    assert sum(t.numel() for t in saved) == q.numel() + 2 * k.numel() + 2 * kc.numel() + gates.numel() + 2 * n * hq
    assert len(fwd.made) == 4, fwd.made
    with CountActivations(tuple(q.shape)) as bwd:
        out.backward(torch.randn(out.shape, generator=gen))
    assert len(bwd.made) == 2, bwd.made
    assert all(t.grad is not None for t in (q, k, v, gates))


def _dense_ssa(module, x):
    """Brute-force SSA from the coords (float64, O(N^2)): the definition of the module's output."""
    cfg = module.config
    hq, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    g = hq // hkv
    c = x.coords.long()
    f = x.feats
    n = f.shape[0]
    q = module.proj_q(f).view(n, hkv, g, d)
    k, v = module.proj_k(f), module.proj_v(f)
    pos = c[:, 1:] % cfg.m_cmp
    k_pe = k + module.intra_block_pe[pos[:, 0], pos[:, 1], pos[:, 2]]
    # compressed tokens: unique (batch, block) cells in any order
    cell, cmp_of = torch.unique(torch.cat([c[:, :1], c[:, 1:] // cfg.m_cmp], 1), dim=0, return_inverse=True)
    onehot = torch.nn.functional.one_hot(cmp_of, len(cell)).double()  # [N, Nc]
    mean = onehot / onehot.sum(0)
    k_cmp = (mean.T @ torch.nn.functional.silu(module.compression_key.proj(k_pe))).view(-1, hkv, d)
    v_cmp = (mean.T @ torch.nn.functional.silu(module.compression_value.proj(v))).view(-1, hkv, d)
    same_sample = c[:, None, 0] == cell[None, :, 0]  # [N, Nc]
    s = torch.einsum("nhgd,chd->nhgc", q, k_cmp) / d**0.5
    p = s.masked_fill(~same_sample[:, None, None], float("-inf")).softmax(-1)
    o_cmp = torch.einsum("nhgc,chd->nhgd", p, v_cmp)
    # selection blocks: compressed probabilities summed into m_slc cells and over the group's heads
    scell, slc_of_cmp = torch.unique(torch.cat([cell[:, :1], cell[:, 1:] // (cfg.m_slc // cfg.m_cmp)], 1),
                                     dim=0, return_inverse=True)
    score = torch.einsum("nhgc,cs->nhs", p, torch.nn.functional.one_hot(slc_of_cmp, len(scell)).double())
    own = c[:, None, 0] == scell[None, :, 0]
    score = score.masked_fill(~own[:, None], -1.0)
    top = score.topk(min(cfg.topk, len(scell)), -1)
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top.indices, top.values >= 0)
    slc_of_token = torch.unique(torch.cat([c[:, :1], c[:, 1:] // cfg.m_slc], 1), dim=0, return_inverse=True)[1]
    mask_slc = chosen[:, :, slc_of_token]  # [N, Hkv, N]
    w = torch.cat([c[:, :1], (c[:, 1:] + cfg.window_shift) // cfg.m_win], 1)
    mask_win = (w[:, None] == w[None, :]).all(-1)
    kk, vv = k.view(n, hkv, d), v.view(n, hkv, d)
    s = torch.einsum("nhgd,mhd->nhgm", q, kk) / d**0.5
    o_slc = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~mask_slc[:, :, None], float("-inf")).softmax(-1), vv)
    o_win = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~mask_win[:, None, None], float("-inf")).softmax(-1), vv)
    gate = module.gate(f)[:, :, None, None, None]
    o = gate[:, 0] * o_cmp + gate[:, 1] * o_slc + gate[:, 2] * o_win
    return module.proj_o(o.reshape(n, hq * d))


@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_module_matches_bruteforce_definition(gen, cfg):
    coords = ssa_coords(gen, shuffle=False)
    order = torch.randperm(len(coords), generator=gen)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen, dtype=torch.float64), coords[order])
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref_mod = SpatialSparseAttention(64, num_heads=4, num_kv_heads=2, config=SSAConfig(**{**cfg.__dict__,
                                                                                         "backend": "torch"}))
    ref_mod = ref_mod.double()
    with torch.no_grad():  # non-zero PE and compression so that they matter
        ref_mod.intra_block_pe.normal_()
    out = ref_mod(x)
    assert torch.equal(out.coords, x.coords)
    assert_rel_close(out.feats, _dense_ssa(ref_mod, x), tol=1e-10)
    # triton backend: same parameters, float32; outputs and every parameter's gradient
    mod = SpatialSparseAttention(64, num_heads=4, num_kv_heads=2, config=cfg)
    mod.load_state_dict({k: v.float() for k, v in ref_mod.state_dict().items()})
    xf = x.replace(x.feats.float())
    y = mod(xf).feats
    assert_rel_close(y, out.feats)
    gout = torch.randn(y.shape, generator=gen)
    y.backward(gout)
    out.feats.backward(gout.double())
    for (name, p), (_, pr) in zip(mod.named_parameters(), ref_mod.named_parameters()):
        assert p.grad is not None, name
        assert_rel_close(p.grad, pr.grad, tol=5e-5)


def test_layout_is_cached_across_layers(gen):
    coords = ssa_coords(gen, shuffle=False)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen), coords)
    a = SpatialSparseAttention(64, 4, 2, config=SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2))
    b = SpatialSparseAttention(64, 4, 2, config=SSAConfig(m_cmp=4, m_slc=4, m_win=4, topk=2))
    y = b(a(x))
    assert len([key for key in y.cache if key[0] == "ssa_layout"]) == 1
    assert a.layout_for(x) is b.layout_for(y)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of m_cmp"):
        SSAConfig(m_cmp=3, m_slc=8)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        build_ssa_layout(torch.zeros(5, 3, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="head_dim"):
        lay = build_ssa_layout(torch.zeros(1, 4, dtype=torch.int32), 4, 4)
        span_attention(torch.zeros(1, 2, 12), torch.zeros(1, 1, 12), torch.zeros(1, 1, 12),
                       lay.compressed_plan(2))


def test_compression_v2_matches_dense_conv(gen):
    """v2 compression against dense Conv3d on the zero-filled coarse grid (submanifold = dense at sites)."""
    from d3ds2.attention.ssa import CompressionV2

    coords = ssa_coords(gen)
    lay = build_ssa_layout(coords, 2, 4)
    c = 32
    x = torch.randn(lay.num_tokens, c, generator=gen, dtype=torch.float64)
    mod = CompressionV2(c, groups=8).double()
    with torch.no_grad():
        for norm in (mod.norm1, mod.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    out = mod(x, lay)
    # reference: per-sample group norm over the sample's tokens, block mean, dense convs
    s = lay.coords.long()
    b = s[:, 0]

    def group_norm(f, batch, norm):
        out = torch.empty_like(f)
        for i in batch.unique():
            m = batch == i
            out[m] = torch.nn.functional.group_norm(f[m].T[None], norm.num_groups, norm.weight, norm.bias, norm.eps)[0].T
        return out

    h = torch.nn.functional.silu(group_norm(x, b, mod.norm1))
    cell, inv = torch.unique(torch.cat([s[:, :1], s[:, 1:] // 2], 1), dim=0, return_inverse=True)
    cnt = torch.bincount(inv).double()[:, None]
    pooled = torch.zeros(len(cell), c, dtype=torch.float64).index_add_(0, inv, h) / cnt
    skip = torch.zeros(len(cell), c, dtype=torch.float64).index_add_(0, inv, x) / cnt
    r = int(cell[:, 1:].max()) + 1
    nb = int(cell[:, 0].max()) + 1

    def conv(f, layer):
        grid = torch.zeros(nb, c, r, r, r, dtype=torch.float64)
        grid[cell[:, 0], :, cell[:, 1], cell[:, 2], cell[:, 3]] = f
        y = torch.nn.functional.conv3d(grid, layer.weight, layer.bias, padding=1)
        return y[cell[:, 0], :, cell[:, 1], cell[:, 2], cell[:, 3]]

    h = conv(pooled, mod.conv1)
    h = conv(torch.nn.functional.silu(group_norm(h, cell[:, 0], mod.norm2)), mod.conv2)
    ref = skip + h
    # out is in the layout's compressed-token order: match through the block coords
    oc = lay.coords[lay.cmp_offsets[:-1].long()].long()
    oc = torch.cat([oc[:, :1], oc[:, 1:] // 2], 1)
    order = torch.unique(torch.cat([oc, cell]), dim=0, return_inverse=True)[1]
    ref_by_cell = torch.empty_like(ref)
    ref_by_cell[order[len(oc):]] = ref
    assert_rel_close(out, ref_by_cell[order[: len(oc)]], tol=1e-6)  # SparseGroupNorm computes in float32


def test_module_with_compression_v2_triton_matches_torch(gen):
    coords = ssa_coords(gen, shuffle=False)
    x = SparseTensor.from_unsorted(torch.randn(len(coords), 64, generator=gen), coords)
    cfg = SSAConfig(m_cmp=2, m_slc=4, m_win=4, topk=3, compression="v2")
    mod = SpatialSparseAttention(64, 4, 2, config=cfg)
    ref = SpatialSparseAttention(64, 4, 2, config=SSAConfig(**{**cfg.__dict__, "backend": "torch"})).double()
    ref.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    y = mod(x).feats
    y_ref = ref(x.replace(x.feats.double())).feats
    assert_rel_close(y, y_ref)
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    y_ref.backward(g.double())
    for (name, p), (_, pr) in zip(mod.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, name
        if pr.grad.norm() > 1e-3:
            assert_rel_close(p.grad, pr.grad, tol=5e-5)
        else:  # biases in front of a GroupNorm / softmax-invariant shifts: the true gradient is 0
            assert p.grad.norm() < 1e-4, name