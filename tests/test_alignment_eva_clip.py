"""OpenCLIP EVA02-E-14-plus image tower (Uni3D's image side) and the shared EVA blocks: official key names and
shapes of the full config (meta device), checkpoint mapping round trip, float64 references."""
import numpy as np
import pytest
import torch

from d3ds2.eval.alignment.eva_clip import (EVA02_E_14_PLUS, TINY_EVA_CLIP, EvaClipImageTower, EvaVisionTrunk,
                                           eva_clip_state_dict)
from d3ds2.eval.alignment.layers import Attention, Block
from eva_reference import attention, block, f64, layer_norm, randomise_


def _official_eva02_e_keys() -> dict:
    """Vision keys of OpenCLIP EVA02-E-14-plus (timm eva02_enormous_patch14_clip_224 under 'visual.trunk.',
    num_classes = embed_dim 1024 as its head; timm/models/eva.py, open_clip timm_model.py + EVA02-E-14-plus.json),
    written from those facts: width 1792, 64 post-norm blocks, 16 heads, fused qkv + q/v bias, GELU MLP 15360,
    224 px / patch 14 -> 256 patches + class token."""
    d, hid, emb = 1792, 15360, 1024
    keys = {"patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
            "pos_embed": (1, 257, d), "norm.weight": (d,), "norm.bias": (d,), "head.weight": (emb, d),
            "head.bias": (emb,)}
    for i in range(64):
        p = f"blocks.{i}."
        keys.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                     p + "attn.q_bias": (d,), p + "attn.v_bias": (d,), p + "attn.proj.weight": (d, d),
                     p + "attn.proj.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                     p + "mlp.fc1.weight": (hid, d), p + "mlp.fc1.bias": (hid,), p + "mlp.fc2.weight": (d, hid),
                     p + "mlp.fc2.bias": (d,)})
    return keys


def test_full_config_matches_the_official_key_list_and_shapes():
    expected = _official_eva02_e_keys()
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in EvaVisionTrunk(EVA02_E_14_PLUS).state_dict().items()}
    assert ours == expected
    assert sum(int(np.prod(s)) for s in ours.values()) == pytest.approx(4.35e9, rel=0.01)  # EVA02-E: 4.4 B
    # An OpenCLIP-style file (meta tensors): visual.trunk.*, text tower, logit_scale, non-persistent k bias.
    official = {"visual.trunk." + k: torch.empty(s, device="meta") for k, s in expected.items()}
    official.update({"logit_scale": torch.empty((), device="meta"),
                     "text.token_embedding.weight": torch.empty(49408, 1280, device="meta"),
                     "visual.trunk.blocks.0.attn.k_bias": torch.empty(1792, device="meta")})
    mapped = eva_clip_state_dict(official)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected


def _tiny_tower(gen) -> EvaClipImageTower:
    tower = EvaClipImageTower(TINY_EVA_CLIP)
    randomise_(tower.trunk, gen)
    return tower


def test_state_dict_round_trip_through_the_openclip_layout(gen, tmp_path):
    tower = _tiny_tower(gen)
    official = {"visual.trunk." + k: v.clone() for k, v in tower.trunk.state_dict().items()}
    official["logit_scale"] = torch.tensor(4.6)
    official["text.positional_embedding"] = torch.zeros(77, 8)
    other = EvaClipImageTower(TINY_EVA_CLIP, seed=1)
    other.trunk.load_state_dict(eva_clip_state_dict(official, TINY_EVA_CLIP))
    images = torch.rand(2, 3, 28, 28, generator=gen)
    assert torch.equal(tower(images), other(images))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({k: v.bfloat16() for k, v in official.items()}, path)
    loaded = EvaClipImageTower.from_checkpoint(str(path), TINY_EVA_CLIP)
    assert loaded.trunk.head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded(images), tower(images), atol=0.05, rtol=0)  # bf16 weights in the file


def test_mapping_errors_name_the_keys(gen):
    official = {"visual.trunk." + k: v for k, v in _tiny_tower(gen).trunk.state_dict().items()}
    broken = dict(official)
    del broken["visual.trunk.blocks.1.attn.q_bias"]
    broken["visual.trunk.blocks.1.attn.q_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.q_bias.*blocks\.1\.attn\.q_proj\.weight"):
        eva_clip_state_dict(broken, TINY_EVA_CLIP)
    bad = dict(official, **{"visual.trunk.head.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match="head.weight"):
        eva_clip_state_dict(bad, TINY_EVA_CLIP)
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        EvaClipImageTower.from_checkpoint("/nowhere.bin", TINY_EVA_CLIP)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_against_float64_reference(gen, fused):
    attn = Attention(24, 3, fused_qkv=fused).double()
    randomise_(attn, gen)
    x = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64)
    ref = attention(x, f64({"a." + k: v for k, v in attn.state_dict().items()}), "a.", 3, fused)
    torch.testing.assert_close(attn(x), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("fused,swiglu,post_norm", [(True, False, True), (True, False, False), (False, True, False)])
def test_block_against_float64_reference(gen, fused, swiglu, post_norm):
    blk = Block(24, 4, 40, fused_qkv=fused, swiglu=swiglu, post_norm=post_norm).double()
    randomise_(blk, gen)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    ref = block(x, f64({"b." + k: v for k, v in blk.state_dict().items()}), "b.", 4, fused, swiglu, post_norm)
    torch.testing.assert_close(blk(x), ref, atol=1e-12, rtol=1e-10)


def test_trunk_against_float64_reference(gen):
    c = TINY_EVA_CLIP
    trunk = EvaVisionTrunk(c).double()
    randomise_(trunk, gen)
    p = f64(trunk.state_dict())
    images = torch.randn(2, 3, c.image_size, c.image_size, generator=gen, dtype=torch.float64)
    g, s = c.image_size // c.patch_size, c.patch_size
    patches = images.reshape(2, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * s * s)
    x = patches @ p["patch_embed.proj.weight"].reshape(c.width, -1).T + p["patch_embed.proj.bias"]
    x = torch.cat([p["cls_token"].expand(2, -1, -1), x], 1) + p["pos_embed"]
    for i in range(c.depth):
        x = block(x, p, f"blocks.{i}.", c.num_heads, c.fused_qkv, c.swiglu, c.post_norm)
    ref = layer_norm(x[:, 0], p["norm.weight"], p["norm.bias"]) @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(trunk(images), ref, atol=1e-11, rtol=1e-9)


def test_tower_preprocess_and_unit_embeddings(gen):
    tower = _tiny_tower(gen)
    rgba = np.zeros((50, 40, 4), np.uint8)
    rgba[10:20, 5:35] = (200, 30, 30, 255)  # a wide foreground: cropped, padded to a square
    images = tower.preprocess([rgba, rgba[..., :3].copy()])
    assert images.shape == (2, 3, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images[0, :, 0, 0], torch.ones(3))  # padding is white
    emb = tower(images)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    big = torch.nn.functional.interpolate(images, size=(56, 56), mode="nearest")  # any size is resized
    assert tower(big).shape == (2, 16)
