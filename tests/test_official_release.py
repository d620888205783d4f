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

from official_layout import FILES, layout, tiny_config, write_release

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
