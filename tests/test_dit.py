"""Sparse and dense DiT: parameter counts of the official configs, adaLN-Zero init, batching invariance."""
import pytest
import torch

from d3ds2.models.dense_dit import DenseDiT
from d3ds2.models.dense_vae import DenseShapeVAE
from d3ds2.models.dit_layers import Context, SparseCondition
from d3ds2.models.sparse_dit import ModulatedSparseBlock, SparseDiT, TokenLayout
from d3ds2.sparse import SparseTensor


def ssa_only_parameters(m_cmp: int, compression: str, kv: int = 64, channels: int = 1024) -> int:
    """Parameters SSA adds to a block over the shared q/k/v/o projections (official shapes)."""
    pe = m_cmp**3 * kv
    if compression == "v1":  # 1x1 conv with bias, for keys and values
        comp = 2 * (kv * kv + kv)
    else:  # GN, conv3^3 (bias), GN, conv3^3 (bias), for keys and values
        comp = 2 * (2 * 2 * kv + 2 * (27 * kv * kv + kv))
    return pe + comp + 3 * channels  # + gate Linear(C, 3, no bias)


@pytest.mark.parametrize(
    "kwargs,m_cmp,compression,expected",
    [({}, 8, "v1", 509_286_416), ({"sparse_conditions": True}, 4, "v2", 520_083_472)],
)
def test_sparse_dit_official_parameter_count(kwargs, m_cmp, compression, expected):
    with torch.device("meta"):
        model = SparseDiT(attention="full", **kwargs)
    n = sum(p.numel() for p in model.parameters())
    assert n + 24 * ssa_only_parameters(m_cmp, compression) == expected
    assert round(expected / 1e6, 2) in (509.29, 520.08)


@pytest.mark.parametrize(
    "kwargs,expected",
    [({"ssa": {"m_cmp": 8, "m_slc": 8, "topk": 8, "compression": "v1"}}, 509_286_416),
     ({"ssa": {"m_cmp": 4, "m_slc": 8, "topk": 32, "compression": "v2"}, "sparse_conditions": True}, 520_083_472)],
)
def test_sparse_dit_parameter_count_with_ssa(kwargs, expected):
    with torch.device("meta"):
        model = SparseDiT(attention="ssa", **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_dense_models_official_parameter_counts():
    with torch.device("meta"):
        dit, vae = DenseDiT(), DenseShapeVAE()
    assert sum(t.numel() for t in dit.state_dict().values()) == 559_737_864  # incl. the pos_emb buffer
    assert len(dit.state_dict()) == 489
    assert sum(p.numel() for p in vae.parameters()) == 193_037_009
    assert len(vae.state_dict()) == 212


def tiny_sparse_dit(**kw) -> SparseDiT:
    args = dict(in_channels=4, model_channels=32, cond_channels=24, num_blocks=2, num_heads=4, num_kv_heads=2, window_size=4, attention="full")
    args.update(kw)
    return SparseDiT(**args).double()


def random_shape(n: int, res: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(res**3, generator=gen)[:n].view(-1, 1).div(torch.tensor([res * res, res, 1]), rounding_mode="floor") % res


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


def test_adaln_zero_init_blocks_only_add_cross_attention():
    gen = torch.manual_seed(0)
    model = tiny_sparse_dit()
    coords = random_shape(30, 8, gen)
    x = SparseTensor.from_samples([torch.randn(30, 32, dtype=torch.float64)], [coords])
    cond = torch.randn(1, 5, 24, dtype=torch.float64)
    ctx = model.context(cond)
    t_emb = model.t_embedder(torch.tensor([500.0]))
    block: ModulatedSparseBlock = model.blocks[0]
    out = block(x.feats, TokenLayout.of(x), t_emb, ctx)
    # gated branches (self-attention, MLP) are zero at init; only the ungated cross-attention remains
    h = torch.nn.functional.layer_norm(x.feats, (32,), block.norm2.weight, block.norm2.bias, 1e-6)
    expected = x.feats + block.cross_attn(h, x.offsets, 30, ctx)
    torch.testing.assert_close(out, expected)
    # and the model predicts exactly zero velocity (zero out_layer)
    v = model(SparseTensor.from_samples([torch.randn(30, 4, dtype=torch.float64)], [coords]), torch.tensor([500.0]), cond)
    assert torch.equal(v.feats, torch.zeros_like(v.feats))


SSA_TINY = {"m_cmp": 2, "m_slc": 4, "topk": 2}


@pytest.mark.parametrize("attention", ["full", "window", "ssa"])
def test_batch_of_two_shapes_equals_each_alone(attention):
    gen = torch.manual_seed(1)
    extra = {"ssa": SSA_TINY, "model_channels": 64} if attention == "ssa" else {}  # SSA kernels: head_dim >= 16
    model = tiny_sparse_dit(attention=attention, **extra)
    randomize(model, gen)
    shapes = [random_shape(n, 8, gen) for n in (37, 12)]
    feats = [torch.randn(len(c), 4, dtype=torch.float64, generator=gen) for c in shapes]
    t = torch.tensor([100.0, 800.0], dtype=torch.float64)
    cond = torch.randn(2, 6, 24, dtype=torch.float64, generator=gen)
    both = model(SparseTensor.from_samples(feats, shapes), t, cond)
    for i in range(2):
        alone = model(SparseTensor.from_samples([feats[i]], [shapes[i]]), t[i : i + 1], cond[i : i + 1])
        torch.testing.assert_close(both.sample(i)[0], alone.feats)
        assert not torch.allclose(alone.feats, torch.zeros_like(alone.feats))


def test_span_attention_kernel_matches_torch_kernel():
    """attention_kernel='span' (Triton, interpreted on the CPU) gives the model of the padded-SDPA path: two shapes
    of different sizes, full self-attention and cross-attention, outputs and parameter gradients (float32)."""
    gen = torch.manual_seed(4)
    shapes = [random_shape(n, 8, gen) for n in (41, 9)]
    feats = [torch.randn(len(c), 4, generator=gen) for c in shapes]
    t, cond = torch.tensor([300.0, 700.0]), torch.randn(2, 6, 24, generator=gen)
    outs, grads = {}, {}
    for kernel in ("span", "torch"):
        model = tiny_sparse_dit(model_channels=64, attention_kernel=kernel).float()  # span kernels: head_dim >= 16
        randomize(model, torch.Generator().manual_seed(5))
        outs[kernel] = model(SparseTensor.from_samples(feats, shapes), t, cond).feats
        outs[kernel].square().sum().backward()
        grads[kernel] = [p.grad for p in model.parameters()]
    torch.testing.assert_close(outs["span"], outs["torch"], atol=1e-4, rtol=1e-4)
    for a, b in zip(grads["span"], grads["torch"]):  # entries near 0 in gradients of scale ~500 carry fp32
        torch.testing.assert_close(a, b, atol=2e-5 * b.abs().max().item(), rtol=1e-3)  # sums' noise, ~1e-3


def test_sparse_conditions_and_checkpointing_match():
    gen = torch.manual_seed(2)
    model = tiny_sparse_dit(sparse_conditions=True, cond_channels=32)
    randomize(model, gen)
    coords = [random_shape(n, 8, gen) for n in (20, 9)]
    x = SparseTensor.from_samples([torch.randn(len(c), 4, dtype=torch.float64, generator=gen) for c in coords], coords)
    cond = SparseCondition(torch.randn(7, 32, dtype=torch.float64, generator=gen), torch.randint(0, 5, (7, 3)), torch.tensor([0, 3, 7]))
    t = torch.tensor([10.0, 990.0])
    ref = model(x, t, cond)
    ref.feats.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.use_checkpoint = True
    out = model(x, t, cond)
    out.feats.square().sum().backward()
    torch.testing.assert_close(out.feats, ref.feats)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_dense_dit_batch_and_shapes():
    gen = torch.manual_seed(3)
    model = DenseDiT(resolution=4, in_channels=3, model_channels=32, cond_channels=16, num_blocks=2, num_heads=4).double()
    randomize(model, gen)
    x = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([50.0, 700.0], dtype=torch.float64)
    cond = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
    out = model(x, t, cond)
    assert out.shape == x.shape
    torch.testing.assert_close(out[1:], model(x[1:], t[1:], cond[1:]))


def test_dense_vae_roundtrip_shapes_and_coords():
    vae = DenseShapeVAE(latent_channels=2, encoder_channels=(4, 8), decoder_channels=(8, 4), encoder_blocks=1, decoder_blocks=1,
                        encoder_middle_blocks=1, decoder_middle_blocks=1)
    occ = (torch.rand(2, 1, 8, 8, 8) > 0.5).float()
    mean, logvar = vae.encode(occ)
    assert mean.shape == logvar.shape == (2, 2, 4, 4, 4)
    logits = vae.decode(mean)
    assert logits.shape == occ.shape
    coords = vae.decode_coords(mean, threshold=0.5)
    dense = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    dense[tuple(coords.long().t())] = True
    assert torch.equal(dense, torch.sigmoid(logits[:, 0]) >= 0.5)


def test_ssa_blocks_in_layout_order_match_canonical_order():
    """The SS-DiT permutes tokens into SSA order once per forward; the same blocks run in the canonical
    order (SSA permuting inside every call, as its SparseTensor forward does) must give the same output."""
    import torch.nn.functional as F

    gen = torch.manual_seed(5)
    model = tiny_sparse_dit(attention="ssa", ssa=SSA_TINY, model_channels=64)
    randomize(model, gen)
    shapes = [random_shape(n, 8, gen) for n in (41, 17)]
    x = SparseTensor.from_samples([torch.randn(len(c), 4, dtype=torch.float64, generator=gen) for c in shapes], shapes)
    t, cond = torch.tensor([300.0, 600.0], dtype=torch.float64), torch.randn(2, 6, 24, dtype=torch.float64, generator=gen)
    out = model(x, t, cond).feats

    tokens = TokenLayout.of(x)  # canonical order, SSA through its SparseTensor forward
    h = model.input_layer(x.feats) + model.pos_embedder(x.coords[:, 1:] * model.pe_factor).double()
    t_emb, ctx = model.t_embedder(t), Context.from_dense(cond)
    for block in model.blocks:
        block.self_attention = lambda f, tok, blk=block: blk.self_attn(tok.x.replace(f)).feats
        h = block(h, tokens, t_emb, ctx)
    ref = model.out_layer(F.layer_norm(h, (64,), eps=1e-5))
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(ref, torch.zeros_like(ref))
