"""ULIP-2 coloured PointBERT: the official checkpoint's key list, the key mapping, and the encoder against a
plain float64 re-implementation of the official forward (tiny random config, CPU)."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from d3ds2.eval.alignment.image_tower import ClipImageTower
from d3ds2.eval.alignment.ulip2 import (ULIP2_POINTBERT, ULIP2_TINY, ULIP2Alignment, ULIP2PointEncoder,
                                        load_ulip2_checkpoint, ulip2_state_dict)

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16, projection_dim=ULIP2_TINY["embed_dim"])


def _official_keys() -> dict[str, tuple]:
    """Parameter/buffer names and shapes of ULIP-2-PointBERT-10k-colored-pc-pretrained.pt's point part (after
    stripping ``module.``), from salesforce/ULIP point_encoder.py / dvae.py / ULIP_models.py and the 10k yaml."""
    pe = "point_encoder."
    keys = {pe + "encoder.first_conv.0.weight": (128, 6, 1), pe + "encoder.first_conv.0.bias": (128,),
            pe + "encoder.first_conv.3.weight": (256, 128, 1), pe + "encoder.first_conv.3.bias": (256,),
            pe + "encoder.second_conv.0.weight": (512, 512, 1), pe + "encoder.second_conv.0.bias": (512,),
            pe + "encoder.second_conv.3.weight": (256, 512, 1), pe + "encoder.second_conv.3.bias": (256,),
            pe + "reduce_dim.weight": (384, 256), pe + "reduce_dim.bias": (384,),
            pe + "cls_token": (1, 1, 384), pe + "cls_pos": (1, 1, 384),
            pe + "pos_embed.0.weight": (128, 3), pe + "pos_embed.0.bias": (128,),
            pe + "pos_embed.2.weight": (384, 128), pe + "pos_embed.2.bias": (384,),
            pe + "norm.weight": (384,), pe + "norm.bias": (384,),
            "pc_projection": (768, 1280)}
    for bn, c in (("encoder.first_conv.1", 128), ("encoder.second_conv.1", 512)):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{pe}{bn}.{s}"] = (c,)
        keys[f"{pe}{bn}.num_batches_tracked"] = ()
    block = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384),  # qkv_bias=False
             "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "norm2.weight": (384,), "norm2.bias": (384,),
             "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536),
             "mlp.fc2.bias": (384,)}
    for i in range(18):
        keys.update({f"{pe}blocks.blocks.{i}.{k}": s for k, s in block.items()})
    return keys


def _randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.rand(t.shape, generator=gen, dtype=t.dtype) if name.endswith("running_var") else \
                torch.randn(t.shape, generator=gen, dtype=t.dtype)
            scale = t[0].numel() ** -0.5 if t.dim() >= 2 else 0.5
            t.copy_(r + 0.5 if name.endswith("running_var") else r * scale)


def _tiny(gen, dtype=torch.float64) -> ULIP2Alignment:
    model = ULIP2Alignment(ClipImageTower(config=TINY_TOWER), config=ULIP2_TINY)
    _randomise(model.encoder, gen)
    return model.to(dtype)


def _points(gen, b=2, n=ULIP2_TINY["n_points"], dtype=torch.float64) -> torch.Tensor:
    xyz = torch.randn(b, n, 3, generator=gen, dtype=dtype) * torch.tensor([1.0, 0.5, 2.0], dtype=dtype) + 3
    return torch.cat([xyz, torch.rand(b, n, 3, generator=gen, dtype=dtype)], -1)


def _official_style(model: ULIP2Alignment) -> dict:
    sd = {"module." + k: v.clone() for k, v in model.encoder.state_dict().items()}
    sd["module.logit_scale"] = torch.tensor(2.6593)
    sd["module.open_clip_model.visual.proj"] = torch.zeros(4, 4)
    sd["module.open_clip_model.logit_scale"] = torch.tensor(4.6)
    return sd


# ------------------------------------------------------------------------------------------------
# plain float64 reference of the official forward (brute force, from the official key names)
def _ref_fps(xyz: np.ndarray, m: int) -> list[int]:
    ok = (xyz ** 2).sum(1) > 1e-3
    chosen, dist = [0], np.full(len(xyz), 1e10)
    for _ in range(m - 1):
        d = ((xyz - xyz[chosen[-1]]) ** 2).sum(1)
        dist = np.where(ok, np.minimum(dist, d), dist)
        chosen.append(int(np.where(ok, dist, -1).argmax()))
    return chosen


def _ref_forward(sd: dict, pts: torch.Tensor, cfg: dict) -> torch.Tensor:
    sd = {k.removeprefix("module."): v.double() for k, v in sd.items()}
    p = lambda k: sd["point_encoder." + k]  # noqa: E731
    out = []
    for cloud in pts.double():
        xyz = cloud[:, :3] - cloud[:, :3].mean(0)
        xyz = xyz / xyz.norm(dim=1).max()
        cloud = torch.cat([xyz, cloud[:, 3:]], 1)
        centers = xyz[_ref_fps(xyz.numpy(), cfg["num_group"])]
        nn_idx = ((xyz[None] - centers[:, None]) ** 2).sum(-1).argsort(1)[:, :cfg["group_size"]]
        groups = cloud[nn_idx]
        groups[..., :3] -= centers[:, None]

        def conv_bn(x, pre):  # x [G, K, C]; Conv1d(k=1) -> BN(eval) -> ReLU -> Conv1d(k=1)
            h = x @ p(pre + ".0.weight")[..., 0].T + p(pre + ".0.bias")
            h = (h - p(pre + ".1.running_mean")) / torch.sqrt(p(pre + ".1.running_var") + 1e-5) * p(pre + ".1.weight") \
                + p(pre + ".1.bias")
            return h.clamp_min(0) @ p(pre + ".3.weight")[..., 0].T + p(pre + ".3.bias")

        f = conv_bn(groups, "encoder.first_conv")
        f = torch.cat([f.max(1, keepdim=True).values.expand_as(f), f], -1)
        tok = conv_bn(f, "encoder.second_conv").max(1).values @ p("reduce_dim.weight").T + p("reduce_dim.bias")
        pos = F.gelu(centers @ p("pos_embed.0.weight").T + p("pos_embed.0.bias")) @ p("pos_embed.2.weight").T \
            + p("pos_embed.2.bias")
        x = torch.cat([p("cls_token")[0], tok])
        pos = torch.cat([p("cls_pos")[0], pos])
        h = cfg["num_heads"]
        ln = lambda y, k: F.layer_norm(y, y.shape[-1:], p(k + ".weight"), p(k + ".bias"), 1e-5)  # noqa: E731
        for i in range(cfg["depth"]):
            b = f"blocks.blocks.{i}."
            x = x + pos
            y = ln(x, b + "norm1")
            q, k, v = (y @ p(b + "attn.qkv.weight").T).reshape(len(y), 3, h, -1).permute(1, 2, 0, 3)
            a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
            x = x + a.transpose(0, 1).reshape(len(y), -1) @ p(b + "attn.proj.weight").T + p(b + "attn.proj.bias")
            y = F.gelu(ln(x, b + "norm2") @ p(b + "mlp.fc1.weight").T + p(b + "mlp.fc1.bias"))
            x = x + y @ p(b + "mlp.fc2.weight").T + p(b + "mlp.fc2.bias")
        x = ln(x, "norm")
        out.append(torch.cat([x[0], x[1:].max(0).values]) @ sd["pc_projection"])
    return F.normalize(torch.stack(out), dim=-1)


# ------------------------------------------------------------------------------------------------
def test_full_size_names_and_shapes_equal_the_official_checkpoint():
    with torch.device("meta"):
        enc = ULIP2PointEncoder(ULIP2_POINTBERT)
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == _official_keys()
    assert sum(v.numel() for v in enc.point_encoder.parameters()) == sum(
        int(np.prod(s)) for k, s in _official_keys().items() if k.startswith("point_encoder.")
        and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_encoder_matches_the_float64_reference_of_the_official_forward(gen):
    model = _tiny(gen)
    pts = _points(gen)
    pts[0, 7, :3] = pts[0, :, :3].mean(0)  # a point at the centroid: skipped by the pointnet2 FPS
    torch.testing.assert_close(model.encode_points(pts), _ref_forward(_official_style(model), pts, ULIP2_TINY))


def test_state_dict_round_trip_through_an_official_checkpoint_file(gen, tmp_path):
    src = _tiny(gen, torch.float32)
    path = tmp_path / "ULIP-2-PointBERT-10k-colored-pc-pretrained.pt"
    torch.save({"epoch": 3, "state_dict": _official_style(src), "best_acc1": 50.6,
                "args": argparse.Namespace(model="ULIP2_PointBERT_Colored", npoints=10000)}, path)
    loaded = ULIP2Alignment.from_checkpoint(path, image_tower=ClipImageTower(config=TINY_TOWER), config=ULIP2_TINY)
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v), k
    pts = _points(gen, dtype=torch.float32)
    torch.testing.assert_close(loaded.encode_points(pts), src.encode_points(pts), rtol=0, atol=0)


def test_key_mapping_names_what_is_wrong(gen, tmp_path):
    model = _tiny(gen, torch.float32)
    expected = model.encoder.state_dict()
    sd = _official_style(model)
    assert set(ulip2_state_dict(sd, expected)) == set(expected)
    missing = dict(sd)
    del missing["module.point_encoder.blocks.blocks.1.attn.qkv.weight"]
    with pytest.raises(KeyError, match=r"missing keys \(1\): \['point_encoder.blocks.blocks.1.attn.qkv.weight'\]"):
        ulip2_state_dict(missing, expected)
    extra = dict(sd, **{"module.point_encoder.cls_head_finetune.0.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected.*cls_head_finetune"):
        ulip2_state_dict(extra, expected)
    xyz_only = dict(sd, **{"module.point_encoder.encoder.first_conv.0.weight": torch.zeros(16, 3, 1)})
    with pytest.raises(ValueError, match="xyz-only pointbert_ULIP-2.pt"):
        ulip2_state_dict(xyz_only, expected)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": missing}, path)
    with pytest.raises(KeyError, match="bad.pt"):
        ULIP2Alignment.from_checkpoint(path, image_tower=ClipImageTower(config=TINY_TOWER), config=ULIP2_TINY)


def test_checkpoint_loading_errors(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="ULIP-2-PointBERT-10k-colored-pc-pretrained.pt"):
        load_ulip2_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "pickled.pt"
    sd = _official_style(_tiny(gen, torch.float32))
    torch.save({"state_dict": sd, "extra": np.float64(1.0)}, path)  # a global weights_only refuses
    with pytest.raises(RuntimeError, match="trust_pickle=True"):
        load_ulip2_checkpoint(path)
    assert set(load_ulip2_checkpoint(path, trust_pickle=True)) == set(sd)
    with pytest.raises(ValueError, match="embeds to 8 dims"):
        ULIP2Alignment(ClipImageTower(config=dict(TINY_TOWER, projection_dim=8)), config=ULIP2_TINY)


def test_invariant_to_point_order_after_the_first_and_to_translation_and_scale(gen):
    model = _tiny(gen)
    pts = _points(gen)
    emb = model.encode_points(pts)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(pts.shape[1] - 1, generator=gen)])
    torch.testing.assert_close(model.encode_points(pts[:, perm]), emb)
    moved = pts.clone()
    moved[..., :3] = moved[..., :3] * 3.7 - torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(model.encode_points(moved), emb)
    recoloured = pts.clone()
    recoloured[..., 3:] = 1 - recoloured[..., 3:]  # colours are an input, not normalised away
    assert (model.encode_points(recoloured) - emb).abs().max() > 1e-8  # float64: any use of colour shows


def test_batchnorm_uses_running_statistics_in_train_mode(gen):
    model = _tiny(gen)
    pts = _points(gen)
    emb = model.encode_points(pts)
    model.train()
    torch.testing.assert_close(model.encode_points(pts), emb)
    torch.testing.assert_close(model.encode_points(pts[:1]), emb[:1])  # no batch statistics


def test_score_is_a_cosine_with_the_image_embedding(gen):
    model = _tiny(gen, torch.float32)
    pts = _points(gen, dtype=torch.float32)
    img = Image.fromarray((torch.rand(40, 30, 3, generator=gen).numpy() * 255).astype(np.uint8))
    s = model.score(pts, [img, img])
    assert s.shape == (2,) and bool((s.abs() <= 1 + 1e-5).all())
    torch.testing.assert_close(s, (model.encode_points(pts) * model.encode_images([img, img])).sum(-1))
