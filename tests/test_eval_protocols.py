"""Alignment protocol presets on a known mesh: point count, normalisation, colour, image preprocessing; the
ULIP-1 checkpoint layout; unknown names."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from d3ds2.eval.alignment import load_alignment_model
from d3ds2.eval.alignment.eva_clip import EvaVisionTrunk
from d3ds2.eval.alignment.ulip1 import (SLIP_VIT_B16, TINY_VIT, ULIP1_POINTBERT, ULIP1_TINY, ULIP1Alignment,
                                        ViTImageTower, ulip1_state_dicts)
from d3ds2.eval.alignment.ulip2 import ULIP2_POINTBERT, ULIP2PointEncoder
from d3ds2.eval.alignment.uni3d import UNI3D_G
from d3ds2.eval.protocols import PROTOCOLS, get_protocol
from eva_reference import block, f64, layer_norm, randomise_
from test_alignment_ulip2 import _official_keys as ulip2_official_keys


def tiny_ulip1(seed: int = 0) -> ULIP1Alignment:
    torch.manual_seed(seed)
    encoder, trunk = ULIP2PointEncoder(ULIP1_TINY), EvaVisionTrunk(TINY_VIT)
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(trunk.parameters()):
            p.copy_(torch.randn_like(p) * 0.2)
    return ULIP1Alignment(encoder, ViTImageTower(trunk, TINY_VIT), ULIP1_TINY)


def box(colour=None) -> trimesh.Trimesh:
    mesh = trimesh.creation.box((2.0, 1.0, 0.5))
    mesh.apply_translation((3.0, -1.0, 0.5))  # off-centre, not unit size: normalisation shows
    if colour is not None:
        mesh.visual.vertex_colors = np.tile(np.array([*colour, 255], np.uint8), (len(mesh.vertices), 1))
    return mesh


def test_point_count_and_colour_of_each_preset():
    d3ds2, flash = get_protocol("d3ds2"), get_protocol("flashvdm")
    red = box((255, 0, 0))
    pts = d3ds2.surface_points(red, 500, seed=1)
    assert pts.shape == (500, 6) and np.allclose(pts[:, 3:], [1, 0, 0])  # mesh colours kept
    assert np.allclose(d3ds2.surface_points(box(), 50)[:, 3:], 0.4)  # uncoloured: grey 0.4
    flat = flash.surface_points(red, 500, seed=1)
    assert np.allclose(flat[:, 3:], 100 / 255) and np.allclose(flat[:, :3], pts[:, :3])  # constant grey, same xyz
    assert np.all(np.abs(flat[:, :3] - [3.0, -1.0, 0.5]) <= [1.0 + 1e-6, 0.5 + 1e-6, 0.25 + 1e-6])  # mesh frame
    model = tiny_ulip1()
    assert flash.apply(model).n_points == 8192 and model.normalise is False
    assert d3ds2.apply(tiny_ulip1()).n_points == ULIP1_TINY["n_points"]  # d3ds2: each model's own count
    assert ULIP2_POINTBERT["n_points"] == UNI3D_G.n_points == 10_000 and ULIP1_POINTBERT["n_points"] == 8192
    assert flash.float32 and not d3ds2.float32


def test_normalisation_on_and_off():
    model = tiny_ulip1()
    pts = torch.from_numpy(get_protocol("d3ds2").surface_points(box(), 256, seed=0))[None]
    moved = pts.clone()
    moved[..., :3] = moved[..., :3] * 3.0 + torch.tensor([5.0, 1.0, -2.0])
    get_protocol("d3ds2").apply(model)
    assert torch.allclose(model.encode_points(pts), model.encode_points(moved), atol=1e-5)
    get_protocol("flashvdm").apply(model)
    assert (model.encode_points(pts) - model.encode_points(moved)).abs().max() > 1e-2
    rgb = pts.clone()
    rgb[..., 3:] = 0.9
    assert torch.allclose(model.encode_points(pts), model.encode_points(rgb))  # ULIP-1 reads xyz only


def test_image_preprocessing_of_each_preset(tmp_path):
    img = np.zeros((60, 90, 4), np.uint8)
    img[20:40, 30:60] = (200, 40, 40, 255)  # an opaque red square on a transparent black background
    Image.fromarray(img, "RGBA").save(tmp_path / "view.png")
    model = tiny_ulip1()
    tower = get_protocol("flashvdm").apply(model).image_tower
    assert tower.centre_crop_pct == 0.9
    x = tower.preprocess([tmp_path / "view.png"])
    assert x.shape == (1, 3, 32, 32) and x[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]  # alpha dropped, black stays
    assert x[0, 0, 16, 16] == pytest.approx(200 / 255, abs=0.02)  # centre crop, no foreground re-centring
    tower = get_protocol("d3ds2").apply(tiny_ulip1()).image_tower
    y = tower.preprocess([tmp_path / "view.png"])
    assert tower.centre_crop_pct is None and y[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # composited on white
    assert tower.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # timm ViT normalisation


def test_ulip1_checkpoint_layout_round_trip(tmp_path):
    model = tiny_ulip1(3)
    official = {f"module.{k}": v for k, v in model.encoder.state_dict().items()}
    trunk = model.image_tower.trunk.state_dict()
    official.update({f"module.visual.{k}": v for k, v in trunk.items() if not k.startswith("head.")})
    official["module.image_projection"] = trunk["head.weight"].t().clone()
    official.update({"module.logit_scale": torch.tensor(2.6), "module.text_projection": torch.zeros(8, 16),
                     "module.transformer.resblocks.0.ln_1.weight": torch.ones(8)})
    with torch.no_grad():
        model.image_tower.trunk.head.bias.zero_()  # ULIP-1's projection has no bias
    torch.save({"state_dict": official, "epoch": 3}, tmp_path / "ulip1.pt")
    loaded = ULIP1Alignment.from_checkpoint(tmp_path / "ulip1.pt", point_config=ULIP1_TINY, vision_config=TINY_VIT)
    pts = torch.randn(2, 256, 6)
    assert torch.allclose(loaded.encode_points(pts), model.encode_points(pts), atol=1e-6)
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(2)]
    assert torch.allclose(loaded.encode_images(images), model.encode_images(images), atol=1e-6)
    del official["module.pc_projection"]
    torch.save({"state_dict": official}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="pc_projection"):
        ULIP1Alignment.from_checkpoint(tmp_path / "bad.pt", point_config=ULIP1_TINY, vision_config=TINY_VIT)


def test_unknown_protocol_and_model_outside_a_protocol_are_clear_errors():
    with pytest.raises(KeyError, match=r"unknown alignment protocol 'hunyuan'.*d3ds2.*flashvdm"):
        get_protocol("hunyuan")
    with pytest.raises(ValueError, match="not part of protocol 'flashvdm'"):
        load_alignment_model("openshape", ckpt="x.pt", protocol=PROTOCOLS["flashvdm"])
    with pytest.raises(ValueError, match="not part of protocol 'flashvdm'"):
        PROTOCOLS["flashvdm"].apply(type("M", (), {"name": "ulip2"})())


def ulip1_official_keys() -> dict[str, tuple]:
    """Keys of pretrained_models_ckpt_zero-sho_classification_checkpoint_pointbert.pt's state dict (without the
    ``module.`` prefix), from the facts in ulip1.py: ULIP-2's PointBERT keys with a 3-channel first conv, 12 blocks
    and a [768, 512] projection; timm vit_base_patch16_224 (num_classes=0) under ``visual.``; the projections, a
    text transformer and the temperature."""
    keys = {k: s for k, s in ulip2_official_keys().items()
            if not any(f"blocks.blocks.{i}." in k for i in range(12, 18))}
    keys["point_encoder.encoder.first_conv.0.weight"] = (128, 3, 1)
    keys["pc_projection"] = (768, 512)
    d = 768
    keys.update({"visual.patch_embed.proj.weight": (d, 3, 16, 16), "visual.patch_embed.proj.bias": (d,),
                 "visual.cls_token": (1, 1, d), "visual.pos_embed": (1, 197, d), "visual.norm.weight": (d,),
                 "visual.norm.bias": (d,), "image_projection": (d, 512), "text_projection": (512, 512),
                 "logit_scale": (), "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
                 "ln_final.weight": (512,), "ln_final.bias": (512,),
                 "transformer.resblocks.0.attn.in_proj_weight": (1536, 512)})
    for i in range(12):
        p = f"visual.blocks.{i}."
        keys.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
                     p + "attn.qkv.bias": (3 * d,), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                     p + "norm2.weight": (d,), p + "norm2.bias": (d,), p + "mlp.fc1.weight": (3072, d),
                     p + "mlp.fc1.bias": (3072,), p + "mlp.fc2.weight": (d, 3072), p + "mlp.fc2.bias": (d,)})
    return keys


def test_full_size_ulip1_maps_the_official_key_list():
    official = {"module." + k: torch.empty(s, device="meta") for k, s in ulip1_official_keys().items()}
    points, vision = ulip1_state_dicts(official, ULIP1_POINTBERT, SLIP_VIT_B16)
    assert len(points) == len([k for k in ulip1_official_keys() if k.startswith("point_encoder.")]) + 1
    assert tuple(vision["head.weight"].shape) == (512, 768) and "pos_embed" in vision


def test_vit_tower_against_float64_reference():
    gen = torch.Generator().manual_seed(0)
    c = TINY_VIT
    trunk = EvaVisionTrunk(c).double()
    randomise_(trunk, gen)
    p = f64(trunk.state_dict())
    assert "blocks.0.attn.qkv.bias" in p and "blocks.0.attn.q_bias" not in p
    images = torch.randn(2, 3, c.image_size, c.image_size, generator=gen, dtype=torch.float64)
    g, s = c.image_size // c.patch_size, c.patch_size
    patches = images.reshape(2, 3, g, s, g, s).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * s * s)
    x = patches @ p["patch_embed.proj.weight"].reshape(c.width, -1).T + p["patch_embed.proj.bias"]
    x = torch.cat([p["cls_token"].expand(2, -1, -1), x], 1) + p["pos_embed"]
    for i in range(c.depth):
        x = block(x, p, f"blocks.{i}.", c.num_heads, True, False, False)  # pre-norm timm ViT blocks
    ref = layer_norm(x[:, 0], p["norm.weight"], p["norm.bias"]) @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(trunk(images), ref, atol=1e-11, rtol=1e-9)
