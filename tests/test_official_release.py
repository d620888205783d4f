"""Released Direct3D-S2 weights: official-layout checkpoints (built from the design digest's tables) load into
d3ds2 models through the key maps, export back bit-identically, and the converted models compute what the
official forward computes (float64 re-implementations from official tensors, small widths)."""
from pathlib import Path

import pytest
import torch

from d3ds2.official import (OfficialCheckpointError, ReleaseConfigError, build_model, export_loaded_release,
                            load_release, official_state_dict, read_release_config, release_config)
from d3ds2.official.config import ReleaseConfig, kind_of
from d3ds2.official.keymap import key_map

from official_layout import layout, tiny_config, write_release

# §8: (parameters in millions, tensors) per config section
COUNTS = {
    "v1.1": {"dense_vae": (193.04, 212), "dense_dit": (559.74, 489), "sparse_vae_512": (37.87, 116),
             "sparse_dit_512": (509.29, 584), "sparse_vae_1024": (37.87, 116), "sparse_dit_1024": (509.29, 584),
             "refiner": (134.74, 253), "refiner_1024": (134.71, 234)},
}
COUNTS["v1.0"] = {**COUNTS["v1.1"], "sparse_dit_512": (520.08, 874), "sparse_dit_1024": (520.08, 874)}


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_full_size_key_maps_match_the_official_tables_and_counts(version):
    cfg_dict = release_config(version)
    cfg = ReleaseConfig(Path("config.yaml"), cfg_dict)
    for section, (mparams, ntensors) in COUNTS[version].items():
        table = layout(cfg_dict, section)
        assert len(table) == ntensors, section
        assert round(sum(torch.Size(s).numel() for s in table.values()) / 1e6, 2) == mparams, section
        with torch.device("meta"):
            model = build_model(cfg, section)
        state = model.state_dict()
        mapped = {e.official: e.official_shape(tuple(state[e.ours].shape)) for e in key_map(kind_of(section), state)}
        assert mapped == table, section


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    out = {}
    for i, version in enumerate(("v1.1", "v1.0")):
        folder = tmp_path_factory.mktemp(f"release_{version}")
        written = write_release(folder, tiny_config(version), torch.Generator().manual_seed(i))
        out[version] = (folder, written)
    return out


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_load_then_export_is_bit_identical(releases, tmp_path, version):
    folder, written = releases[version]
    rel = load_release(folder)
    assert rel.version == version and set(rel.models) == set(COUNTS[version])
    out = export_loaded_release(rel, tmp_path / "export")
    for fname, ckpt in written.items():
        back = torch.load(out / fname, weights_only=True)
        assert sorted(back) == sorted(ckpt), fname
        for key, state in ckpt.items():
            assert sorted(back[key]) == sorted(state), (fname, key)
            for name, t in state.items():
                assert back[key][name].dtype == t.dtype and torch.equal(back[key][name], t), (fname, key, name)
    assert read_release_config(out).sections == read_release_config(folder).sections
    again = load_release(out)  # the exported folder loads again
    for sec, m in rel.models.items():
        for (k, a), b in zip(m.state_dict().items(), again.models[sec].state_dict().values()):
            assert torch.equal(a, b), (sec, k)


def test_sparse_conv_kernel_mapping_uses_torchsparse_offset_order(releases):
    """Our converted weight W[:, :, x, y, z] must be torchsparse kernel[(z+1)*9 + (y+1)*3 + (x+1)]^T."""
    folder, written = releases["v1.1"]
    rel = load_release(folder, ("sparse_vae_512",))
    vae = rel.models["sparse_vae_512"]
    kernel = written["model_sparse_512.ckpt"]["vae"]["decoder.upsample.1.act_layers.0.conv.kernel"].double()
    w = vae.decoder.upsample[1].act_layers[0].weight.double()
    for dx, dy, dz in [(-1, 0, 1), (1, -1, 0), (0, 1, -1), (1, 1, 1)]:
        assert torch.equal(w[:, :, dx + 1, dy + 1, dz + 1], kernel[(dz + 1) * 9 + (dy + 1) * 3 + (dx + 1)].t())


def test_bad_release_folders_name_the_file_and_the_fix(releases, tmp_path):
    import shutil

    folder, written = releases["v1.1"]
    v10, _ = releases["v1.0"]
    # a missing file
    broken = tmp_path / "missing"
    shutil.copytree(folder, broken)
    (broken / "model_refiner.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="model_refiner.ckpt.*missing.*huggingface-cli download"):
        load_release(broken)
    # a v1.0 sparse checkpoint with the v1.1 config
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    shutil.copy(v10 / "model_sparse_512.ckpt", mixed / "model_sparse_512.ckpt")
    with pytest.raises(OfficialCheckpointError, match=r"model_sparse_512.ckpt\['dit'\].*v1.0 weights.*direct3d-s2-v-1-0"):
        load_release(mixed, ("sparse_dit_512",))
    # a truncated download
    cut = tmp_path / "cut"
    shutil.copytree(folder, cut)
    data = (cut / "model_dense.ckpt").read_bytes()
    (cut / "model_dense.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialCheckpointError, match="model_dense.ckpt: cannot be read.*truncated"):
        load_release(cut, ("dense_vae",))
    # another model's checkpoint under this name
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    shutil.copy(folder / "model_refiner_1024.ckpt", swapped / "model_dense.ckpt")
    with pytest.raises(OfficialCheckpointError, match="top-level key 'vae' missing.*model_refiner"):
        load_release(swapped, ("dense_vae",))
    # the right top-level keys but the weights of the other resolution's refiner
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    torch.save({"refiner": written["model_refiner_1024.ckpt"]["refiner"]}, other / "model_refiner.ckpt")
    with pytest.raises(OfficialCheckpointError, match=r"model_refiner.ckpt\['refiner'\].*19 missing \[adaptive_conv1.*mis-shaped \[unet3d1.conv_in.weight: got"):
        load_release(other, ("refiner",))
    # a config.yaml of something else
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text("model: {lr: 1}\n")
    with pytest.raises(ReleaseConfigError, match="not the config.yaml of a Direct3D-S2 release"):
        load_release(tmp_path / "cfg")


def test_export_of_a_fresh_model_has_official_names_and_float16(releases):
    folder, written = releases["v1.0"]
    cfg = read_release_config(folder)
    dit = build_model(cfg, "sparse_dit_512")
    state = official_state_dict(dit, "sparse_dit_512", dtype=torch.float16)
    ref = written["model_sparse_512.ckpt"]["dit"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert all(v.dtype == torch.float16 for v in state.values())


# ------------------------------------------------------------------------------------------------
# forward equivalence against float64 re-implementations of the official forward (tests/official_reference.py)
import official_reference as ref  # noqa: E402
from d3ds2.sparse import SparseTensor  # noqa: E402
from sparse_helpers import shell  # noqa: E402


def _double(model):
    return model.double().eval()


def test_sparse_vae_matches_official_forward(releases):
    folder, written = releases["v1.1"]
    vae = _double(load_release(folder, ("sparse_vae_512",)).models["sparse_vae_512"])
    p = ref.f64(written["model_sparse_512.ckpt"]["vae"])
    gen = torch.Generator().manual_seed(3)
    coords = shell(64, 9.0, 1.0)  # fine voxels of one sample at 512-stage resolution 64 (latent 8)
    feats = torch.rand(len(coords), 1, generator=gen, dtype=torch.float64) * 2 - 1
    x = SparseTensor(feats, coords, 1)
    z, post = vae.encode(x, sample=False)
    mean, lat_coords = ref.sparse_vae_encode(p, x.feats, x.coords[:, 1:], heads=2, blocks=2, groups=(4, 8, 16, 32))
    assert torch.equal(z.coords[:, 1:], lat_coords.int())
    torch.testing.assert_close(z.feats, mean, rtol=1e-5, atol=1e-5)  # d3ds2's mean pooling accumulates in float32
    zr = torch.randn(z.feats.shape, generator=gen, dtype=torch.float64)
    sdf = vae.decode(z.replace(zr)).sdf
    want, fine = ref.sparse_vae_decode(p, zr, lat_coords, heads=2, blocks=2)
    order = ref._pack(fine).argsort()
    assert torch.equal(sdf.coords[:, 1:].long(), fine[order])
    torch.testing.assert_close(sdf.feats[:, 0].double(), want[order], rtol=1e-3, atol=2e-4)  # SparseLinear and tanh run in float32


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_ssa_compression_matches_official(releases, version):
    from d3ds2.attention.ssa import build_ssa_layout

    folder, written = releases[version]
    dit = _double(load_release(folder, ("sparse_dit_512",)).models["sparse_dit_512"])
    attn = dit.blocks[1].self_attn
    p = ref.f64(written["model_sparse_512.ckpt"]["dit"])
    pre = "blocks.1.self_attn"
    cb, kv = attn.config.m_cmp, attn.num_kv_heads * attn.head_dim
    gen = torch.Generator().manual_seed(4)
    coords = shell(16, 6.0, 1.5)
    x = torch.randn(len(coords), kv, generator=gen, dtype=torch.float64)
    layout = build_ssa_layout(coords, cb, attn.config.m_slc)
    pos = coords[:, 1:].long() % cb
    x_pe = x + p[f"{pre}.intra_block_pe"][pos[:, 0], pos[:, 1], pos[:, 2]]
    for module, name, inp in ((attn.compression_key, "compression_key", x_pe), (attn.compression_value, "compression_value", x)):
        ours = module(inp[layout.perm], layout)
        want, blocks = ref.compression(p, f"{pre}.{name}", inp, coords[:, 1:], cb, attn.config.compression)
        first = layout.cmp_offsets[:-1].long()
        our_blocks = torch.div(layout.coords[first, 1:].long(), cb, rounding_mode="floor")
        idx = torch.searchsorted(ref._pack(blocks), ref._pack(our_blocks))
        torch.testing.assert_close(ours, want[idx], rtol=1e-5, atol=1e-6)  # sparse GroupNorm runs in float32
    # the PE table itself is indexed as coord % cb over (x, y, z)
    assert torch.equal(attn.intra_block_pe, p[f"{pre}.intra_block_pe"])


def test_refiners_match_official_forward_and_patch_stitching(releases):
    folder, written = releases["v1.1"]
    rel = load_release(folder, ("refiner", "refiner_1024"))
    xl, sign = _double(rel.models["refiner"]), _double(rel.models["refiner_1024"])
    pxl = ref.f64(written["model_refiner.ckpt"]["refiner"])
    psg = ref.f64(written["model_refiner_1024.ckpt"]["refiner"])
    gen = torch.Generator().manual_seed(5)
    sdf = torch.rand(1, 1, 12, 12, 12, generator=gen, dtype=torch.float64) * 2 - 1
    feats = torch.randn(1, 4, 12, 12, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(xl(sdf, feats), ref.refiner_xl(pxl, sdf, feats, 2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sign.logits(sdf), ref.conv3d(ref.unet(ref.conv3d(sdf, psg, "conv_in"), psg, 2), psg, "conv_out"),
                               rtol=1e-9, atol=1e-9)
    # patch-wise refinement of a sparse band at fine 32 (3 patches of 12 at stride 10 per axis) = the official
    # dense grid (+1 / 0 where empty) + 27 patch forwards + stitching along z, y, x with linear ramps
    import itertools

    from d3ds2.sparse.spatial import mean_pool

    xl.patch_size, sign.patch_size = 12, 8
    coords = shell(32, 9.0, 1.5)
    s = SparseTensor(torch.rand(len(coords), 1, generator=gen, dtype=torch.float64) * 2 - 1, coords, 1)
    f = s.replace(torch.randn(len(coords), 4, generator=gen, dtype=torch.float64))
    dense_sdf = torch.ones(32, 32, 32, dtype=torch.float64)
    dense_feat = torch.zeros(4, 32, 32, 32, dtype=torch.float64)
    c = coords[:, 1:].long()
    dense_sdf[c[:, 0], c[:, 1], c[:, 2]] = s.feats[:, 0]
    dense_feat[:, c[:, 0], c[:, 1], c[:, 2]] = f.feats.t()
    starts = [0, 10, 20]
    patches = []
    for x0, y0, z0 in itertools.product(starts, repeat=3):
        box = (slice(x0, x0 + 12), slice(y0, y0 + 12), slice(z0, z0 + 12))
        patches.append(ref.refiner_xl(pxl, dense_sdf[box][None, None], dense_feat[(slice(None),) + box][None], 2)[0, 0])
    torch.testing.assert_close(xl.refine(s, f, 32)[0].double(), ref.blend_official(patches, starts, 12, 32),
                               rtol=1e-6, atol=1e-6)
    # sign refiner: 2x mean-pooled grid at 16 (+1 where empty), 3 patches of 8 at stride 4, later patches overwrite;
    # sign upsampled x2, decoded values kept on the active voxels
    half, _ = mean_pool(s, 2)
    grid = torch.ones(16, 16, 16, dtype=torch.float64)
    hc = half.coords[:, 1:].long()
    grid[hc[:, 0], hc[:, 1], hc[:, 2]] = half.feats[:, 0].double()
    sg = torch.ones(16, 16, 16, dtype=torch.float64)
    for x0, y0, z0 in itertools.product([0, 4, 8], repeat=3):
        box = (slice(x0, x0 + 8), slice(y0, y0 + 8), slice(z0, z0 + 8))
        sg[box] = ref.refiner_sign(psg, grid[box][None, None], 2)[0, 0].double()
    want = sg.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    want[c[:, 0], c[:, 1], c[:, 2]] = s.feats[:, 0]
    torch.testing.assert_close(sign.refine(s, 32)[0].double(), want, rtol=0, atol=1e-6)


def test_official_spec_initialises_training_nets(releases):
    """``model.init_from=official:DIR`` (and ``model.vae_ckpt=official:DIR``) go through load_net_weights."""
    from d3ds2.checkpoint import load_net_weights
    from d3ds2.official.init import parse_spec

    folder, _ = releases["v1.1"]
    cfg = read_release_config(folder)
    want = load_release(folder, ("sparse_dit_1024", "sparse_vae_512", "dense_dit"))
    for section in ("sparse_dit_1024", "sparse_vae_512", "dense_dit"):
        net = build_model(cfg, section)  # fresh random init, same hyper-parameters (pe_factor picks the 1024 DiT)
        load_net_weights(f"official:{folder}", net)
        for (k, a), b in zip(net.state_dict().items(), want.models[section].state_dict().values()):
            assert torch.equal(a, b), (section, k)
    assert parse_spec(f"official:{folder}#sparse_vae_1024") == (folder, "sparse_vae_1024")
    wrong = build_model(read_release_config(releases["v1.0"][0]), "sparse_dit_512")
    from d3ds2.official.loading import load_section

    with pytest.raises(OfficialCheckpointError, match="v1.1 weights.*config.yaml describes v1.0"):
        load_section(read_release_config(releases["v1.0"][0]), "sparse_dit_512", folder)  # v1.1 files, v1.0 config
    with pytest.raises(ValueError, match="does not fit this SparseDiT"):
        load_net_weights(f"official:{folder}#sparse_dit_512", wrong)


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_sparse_dit_matches_official_forward(releases, version):
    from d3ds2.models.sparse_dit import SparseCondition

    folder, written = releases[version]
    rel = load_release(folder, ("sparse_dit_512",))
    dit = _double(rel.models["sparse_dit_512"])
    params = rel.config.params("sparse_dit_512")
    p = ref.f64(written["model_sparse_512.ckpt"]["dit"])
    gen = torch.Generator().manual_seed(6)
    coords = shell(16, 5.0, 1.0)
    x = SparseTensor(torch.randn(len(coords), 16, generator=gen, dtype=torch.float64), coords, 1)
    tokens = torch.randn(1, 9, params["cond_channels"], generator=gen, dtype=torch.float64)
    if params["sparse_conditions"]:
        pos = torch.tensor([[0, 0, 1], [0, 0, 1], [3, 1, 0], [0, 2, 0], [1, 1, 0], [2, 2, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0]])
        cond = SparseCondition(tokens[0], pos.int(), torch.tensor([0, 9], dtype=torch.int32))
    else:
        pos, cond = None, tokens
    t = 734.5
    got = dit(x, torch.tensor([t], dtype=torch.float64), cond).feats
    want = ref.sparse_dit(p, params, x.feats, coords[:, 1:].long(), t, tokens[0], pos)
    # the timestep features and the PE are computed in float32 (as officially): ~1e-4 relative to the output
    # scale; a wrong layout, shift or order is O(1)
    assert (got.double() - want).abs().max() <= 2e-4 * want.abs().max(), (got.double() - want).abs().max()


def test_dense_models_match_official_forward(releases):
    folder, written = releases["v1.1"]
    rel = load_release(folder, ("dense_vae", "dense_dit"))
    vae, dit = _double(rel.models["dense_vae"]), _double(rel.models["dense_dit"])
    p = ref.f64(written["model_dense.ckpt"]["vae"])
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(1, 8, 2, 2, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(vae.decode(z), ref.dense_vae_decode(p, z, rel.config.params("dense_vae")), rtol=1e-9, atol=1e-9)
    params = {**rel.config.params("dense_dit"), "resolution": 2}
    big = ReleaseConfig(Path("config.yaml"), {**rel.config.sections, "dense_dit": {"params": params}})
    dit = _double(build_model(big, "dense_dit"))  # 2³ tokens so that attention mixes positions
    gen_state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * 0.2 for k, v in dit.state_dict().items()}
    dit.load_state_dict(gen_state)
    pd = {e.official: e.to_official(gen_state[e.ours]) for e in key_map("dense_dit", gen_state)}
    x = torch.randn(1, 8, 2, 2, 2, generator=gen, dtype=torch.float64)
    cond = torch.randn(1, 5, params["cond_channels"], generator=gen, dtype=torch.float64)
    got = dit(x, torch.tensor([311.0], dtype=torch.float64), cond)
    want = ref.dense_dit(pd, params, x, 311.0, cond[0])
    assert (got - want).abs().max() <= 2e-4 * want.abs().max()  # float32 timestep features, as officially
