"""Sparse SDF VAE: official v1.1 sizes, shapes, posterior, chunked decoding, occupancy pruning."""
from __future__ import annotations

import torch

from d3ds2.data.sdf_transforms import analytic_sample, collate
from d3ds2.models.sparse_blocks import SparseSelfAttention, SparseTransformerBlock
from d3ds2.models.sparse_sdf_vae import DiagonalGaussian, SparseSDFVAE, occupancy_targets
from d3ds2.sparse import SparseTensor

TINY = dict(model_channels=32, encoder_channels=(8, 16, 16, 32), decoder_channels=(16, 16, 8), num_blocks=2,
            num_heads=2, latent_channels=4)


def _batch(res=16):
    return collate([analytic_sample("sphere", res, radius=0.5), analytic_sample("box", res, half=0.4)], 8.0)


def test_v11_parameter_count_and_names():
    vae = SparseSDFVAE()
    sd = vae.state_dict()
    # per-module arithmetic of the official v1.1 layout (docs/vae.md): 22,637,024 + 15,237,089
    assert sum(p.numel() for p in vae.encoder.parameters()) == 22_637_024
    assert sum(p.numel() for p in vae.decoder.parameters()) == 15_237_089
    assert sum(p.numel() for p in vae.parameters()) == 37_874_113
    assert len(sd) == 116  # tensors in the official checkpoint's 'vae' dict
    assert sd["encoder.input_layer1.weight"].shape == (32, 1)
    assert sd["encoder.downsample.2.out_layers.0.weight"].shape == (512, 128, 3, 3, 3)
    assert sd["encoder.downsample.0.skip_connection.weight"].shape == (64, 32, 1, 1, 1)
    assert sd["encoder.blocks.3.attn.to_qkv.weight"].shape == (1536, 512)
    assert sd["encoder.blocks.3.mlp.mlp.2.weight"].shape == (512, 2048)
    assert sd["encoder.out_layer.weight"].shape == (32, 512)
    assert sd["decoder.input_layer.weight"].shape == (512, 16)
    assert sd["decoder.upsample.0.act_layers.0.weight"].shape == (128, 512, 3, 3, 3)
    assert sd["decoder.upsample.2.out_layers.0.weight"].shape == (32, 32, 3, 3, 3)
    assert sd["decoder.out_layer.weight"].shape == (1, 32)
    assert [b.attn.shift for b in vae.encoder.blocks] == [0, 4, 0, 4]
    assert all(b.attn.window == 8 for b in vae.decoder.blocks)


def test_round_trip_shapes_and_voxel_sets():
    torch.manual_seed(0)
    batch = _batch()
    vae = SparseSDFVAE(**TINY)
    z, post = vae.encode(batch.inputs)
    lat = torch.cat([batch.inputs.coords[:, :1], batch.inputs.coords[:, 1:] // 8], 1)
    assert torch.equal(z.coords, torch.unique(lat, dim=0))
    assert z.feats.shape == (z.num_voxels, 4)
    out = vae.decode(z)
    assert out.sdf.feats.shape == (z.num_voxels * 512, 1)
    # decoded set = every fine voxel of every latent cell = the target set of the data layout
    assert torch.equal(out.sdf.coords, batch.targets.coords)
    assert out.sdf.feats.abs().max() < 1
    assert out.feats.feats.shape[1] == 8


def test_posterior_kl_and_sampling():
    mean = torch.randn(50, 3, dtype=torch.float64)
    logvar = torch.randn(50, 3, dtype=torch.float64)
    coords = torch.cat([torch.zeros(50, 1), torch.arange(50).view(-1, 1), torch.zeros(50, 2)], 1).int()
    post = DiagonalGaussian(SparseTensor(torch.cat([mean, logvar], 1), coords))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).mean()
    torch.testing.assert_close(post.kl(), ref)
    s = post.sample(torch.Generator().manual_seed(1))
    assert s.feats.shape == (50, 3) and not torch.equal(s.feats, mean)
    assert torch.equal(post.mode().feats, mean)


def test_window_attention_block_matches_dense_per_window():
    torch.manual_seed(0)
    coords = torch.unique(torch.randint(0, 12, (60, 3)), dim=0)
    x = SparseTensor.from_samples([torch.randn(coords.shape[0], 8, dtype=torch.float64)], [coords.int()])
    attn = SparseSelfAttention(8, 2, "window", window=4, shift=2).double()
    out = attn(x).feats
    qkv = attn.to_qkv(x.feats).view(-1, 3, 2, 4)
    win = torch.div(x.coords[:, 1:] + 2, 4, rounding_mode="floor")
    ref = torch.empty_like(out)
    for w in torch.unique(win, dim=0):
        m = (win == w).all(1)
        q, k, v = qkv[m].unbind(1)
        a = torch.einsum("qhd,khd->hqk", q, k).div(2.0).softmax(-1)
        ref[m] = attn.to_out(torch.einsum("hqk,khd->qhd", a, v).reshape(-1, 8))
    torch.testing.assert_close(out, ref)
    full = SparseTransformerBlock(8, 2, attn_mode="full").double()
    assert full(x).feats.shape == x.feats.shape


def test_chunked_decode_equals_full_decode():
    torch.manual_seed(0)
    # a bent line of 12 latent cells: chunks of 2 cells with a 3-cell halo see only part of it
    xyz = torch.tensor([[i, 0, 0] for i in range(8)] + [[7, j, 1] for j in range(1, 5)], dtype=torch.int32)
    z = SparseTensor.from_samples([torch.randn(xyz.shape[0], 4, dtype=torch.float64)], [xyz])
    vae = SparseSDFVAE(**TINY).double().eval()
    for p in vae.decoder.out_layer.parameters():
        torch.nn.init.normal_(p)
    with torch.no_grad():
        full = vae.decode(z)
        vae.chunk_size = 2
        chunked = vae.decode(z)
    assert full.sdf.num_voxels == 12 * 512
    assert torch.equal(chunked.sdf.coords, full.sdf.coords)
    torch.testing.assert_close(chunked.sdf.feats, full.sdf.feats)
    vae.chunk_halo = 1  # too little context: the seams differ
    with torch.no_grad():
        assert not torch.allclose(vae.decode(z).sdf.feats, full.sdf.feats)


def test_random_chunk_training_decode_is_one_chunk():
    torch.manual_seed(0)
    batch = collate([analytic_sample("sphere", 48, radius=0.7)], 8.0)
    vae = SparseSDFVAE(**TINY, train_chunk=2).train()
    out, _ = vae(batch.inputs)
    cells = torch.unique(torch.div(out.sdf.coords[:, 1:], 16, rounding_mode="floor"), dim=0)
    assert cells.shape[0] == 1 and out.sdf.num_voxels > 0
    assert out.sdf.num_voxels < batch.targets.num_voxels


def test_occupancy_head_prunes_and_keeps_targets():
    torch.manual_seed(0)
    batch = _batch()
    vae = SparseSDFVAE(**TINY, occupancy_head=True)
    band = batch.targets.coords[batch.targets.feats[:, 1] > 0.5]
    for level in vae.decoder.occupancy:  # predict "empty" everywhere: only the forced targets survive
        torch.nn.init.zeros_(level.weight)
        torch.nn.init.constant_(level.bias, -5.0)
    out, _ = vae(batch.inputs, target_coords=band)
    assert len(out.occupancy) == 3
    assert torch.equal(out.sdf.coords, band)
    vae.eval()
    with torch.no_grad():
        pruned, _ = vae(batch.inputs)
    assert pruned.sdf.num_voxels == 0
    t = occupancy_targets(torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32),
                          torch.tensor([[0, 3, 1, 1]], dtype=torch.int32), 2)
    assert t.tolist() == [False, True]
