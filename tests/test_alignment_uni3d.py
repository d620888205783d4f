"""Uni3D point encoder: official key names and shapes of Uni3D-g / Uni3D-l (meta device), checkpoint mapping
round trip, the pointnet2 FPS rule, float64 references, invariances of the embedding."""
import math

import numpy as np
import pytest
import torch

from d3ds2.eval.alignment.eva_clip import TINY_EVA_CLIP, EvaClipImageTower
from d3ds2.eval.alignment.points import POINTNET2_SKIP_SQ_NORM, farthest_point_sample, gather, normalise_unit_sphere
from d3ds2.eval.alignment.uni3d import (TINY_UNI3D, TINY_UNI3D_SWIGLU, UNI3D_G, UNI3D_L, Uni3DAlignment, Uni3DConfig,
                                        Uni3DPointEncoder, uni3d_state_dict)
from eva_reference import block, f64, gelu, layer_norm, randomise_


def _official_uni3d_keys(d, depth, hidden, fused, swiglu, img, classes=1000, enc=512, emb=1024, patch=14):
    """Keys of the official Uni3D model.pt 'module' dict, from baaivision/Uni3D models/uni3d.py +
    point_encoder.py (Uni3D(logit_scale, point_encoder(... visual = timm model))) and timm eva.py."""
    keys = {"logit_scale": ()}
    pe = {"encoder.first_conv.0.weight": (128, 6, 1), "encoder.first_conv.0.bias": (128,),
          "encoder.first_conv.3.weight": (256, 128, 1), "encoder.first_conv.3.bias": (256,),
          "encoder.second_conv.0.weight": (512, 512, 1), "encoder.second_conv.0.bias": (512,),
          "encoder.second_conv.3.weight": (enc, 512, 1), "encoder.second_conv.3.bias": (enc,),
          "encoder2trans.weight": (d, enc), "encoder2trans.bias": (d,),
          "trans2embed.weight": (emb, d), "trans2embed.bias": (emb,),
          "cls_token": (1, 1, d), "cls_pos": (1, 1, d),
          "pos_embed.0.weight": (128, 3), "pos_embed.0.bias": (128,),
          "pos_embed.2.weight": (d, 128), "pos_embed.2.bias": (d,),
          "visual.patch_embed.proj.weight": (d, 3, patch, patch), "visual.patch_embed.proj.bias": (d,),
          "visual.cls_token": (1, 1, d), "visual.pos_embed": (1, (img // patch) ** 2 + 1, d),
          "visual.fc_norm.weight": (d,), "visual.fc_norm.bias": (d,),
          "visual.head.weight": (classes, d), "visual.head.bias": (classes,)}
    for conv, ch in (("first_conv", 128), ("second_conv", 512)):
        for b in ("weight", "bias", "running_mean", "running_var"):
            pe[f"encoder.{conv}.1.{b}"] = (ch,)
        pe[f"encoder.{conv}.1.num_batches_tracked"] = ()
    for i in range(depth):
        p = f"visual.blocks.{i}."
        pe.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.proj.weight": (d, d),
                   p + "attn.proj.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                   p + "mlp.fc2.weight": (d, hidden), p + "mlp.fc2.bias": (d,)})
        if fused:
            pe.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.q_bias": (d,), p + "attn.v_bias": (d,)})
        else:
            pe.update({p + "attn.q_proj.weight": (d, d), p + "attn.q_proj.bias": (d,),
                       p + "attn.k_proj.weight": (d, d), p + "attn.v_proj.weight": (d, d),
                       p + "attn.v_proj.bias": (d,)})
        if swiglu:
            pe.update({p + "mlp.fc1_g.weight": (hidden, d), p + "mlp.fc1_g.bias": (hidden,),
                       p + "mlp.fc1_x.weight": (hidden, d), p + "mlp.fc1_x.bias": (hidden,),
                       p + "mlp.norm.weight": (hidden,), p + "mlp.norm.bias": (hidden,)})
        else:
            pe.update({p + "mlp.fc1.weight": (hidden, d), p + "mlp.fc1.bias": (hidden,)})
    keys.update({"point_encoder." + k: s for k, s in pe.items()})
    return keys


@pytest.mark.parametrize("config,facts", [
    (UNI3D_G, dict(d=1408, depth=40, hidden=6144, fused=True, swiglu=False, img=560)),  # eva_giant_patch14_560
    (UNI3D_L, dict(d=1024, depth=24, hidden=2730, fused=False, swiglu=True, img=448)),  # eva02_large_patch14_448
])
def test_full_configs_match_the_official_key_list_and_shapes(config, facts):
    official = _official_uni3d_keys(**facts)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Uni3DPointEncoder(config).state_dict().items()}
    # The mapping is the only difference: strip prefixes, visual.blocks/fc_norm -> blocks/fc_norm, drop the rest.
    unused = {k for k in official if k == "logit_scale" or k.startswith(tuple(
        "point_encoder.visual." + u for u in ("patch_embed", "pos_embed", "cls_token", "head")))}
    renamed = {k.removeprefix("point_encoder.").replace("visual.", "", 1): s
               for k, s in official.items() if k not in unused}
    assert ours == renamed
    for prefix in ("module.", ""):  # main.py strips 'module.' when present
        meta = {prefix + k: torch.empty(s, device="meta") for k, s in official.items()}
        mapped = uni3d_state_dict({"module": meta, "epoch": 3}, config)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    if config is UNI3D_G:
        n = sum(math.prod(s) for k, s in ours.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked")))
        assert n == pytest.approx(1.0e9, rel=0.02)  # "one billion parameters" (Uni3D paper / README)


def _official_from(encoder: Uni3DPointEncoder, gen) -> dict:
    """An official-style checkpoint dict built from our module (inverse renaming + the unused timm parts)."""
    c = encoder.config
    sd = {}
    for k, v in encoder.state_dict().items():
        k = "visual." + k if k.startswith(("blocks.", "fc_norm.")) else k
        sd["module.point_encoder." + k] = v.clone()
    sd["module.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    # the timm model's unused image stem and classifier (a 28 px image of 14 px patches, 10 classes)
    for k, shape in {"visual.patch_embed.proj.weight": (c.trans_dim, 3, 14, 14),
                     "visual.patch_embed.proj.bias": (c.trans_dim,), "visual.cls_token": (1, 1, c.trans_dim),
                     "visual.pos_embed": (1, 5, c.trans_dim), "visual.head.weight": (10, c.trans_dim),
                     "visual.head.bias": (10,)}.items():
        sd["module.point_encoder." + k] = torch.randn(shape, generator=gen)
    return {"module": sd, "epoch": 10, "best_acc1": 55.3}


def _tiny_encoder(gen, config=TINY_UNI3D) -> Uni3DPointEncoder:
    enc = Uni3DPointEncoder(config)
    randomise_(enc, gen)
    return enc.eval()


def _cloud(gen, b=2, n=200):
    xyz = torch.randn(b, n, 3, generator=gen) * torch.tensor([1.0, 0.6, 0.3]) + 0.2
    return torch.cat([xyz, torch.rand(b, n, 3, generator=gen)], -1)


@pytest.mark.parametrize("config", [TINY_UNI3D, TINY_UNI3D_SWIGLU])
def test_state_dict_round_trip_and_from_checkpoint(gen, tmp_path, config):
    enc = _tiny_encoder(gen, config)
    official = _official_from(enc, gen)
    other = Uni3DPointEncoder(config).eval()
    other.load_state_dict(uni3d_state_dict(official, config))
    points = normalise_unit_sphere(_cloud(gen)[..., :3])
    points = torch.cat([points, torch.rand(2, 200, 3, generator=gen)], -1)
    with torch.no_grad():
        assert torch.equal(enc(points), other(points))
    path = tmp_path / "model.pt"
    torch.save(official, path)
    model = Uni3DAlignment.from_checkpoint(str(path), config=config)
    raw = _cloud(gen)
    with torch.no_grad():
        expect = torch.nn.functional.normalize(enc(torch.cat([normalise_unit_sphere(raw[..., :3]), raw[..., 3:]],
                                                             -1)), dim=-1)
    torch.testing.assert_close(model.encode_points(raw), expect)
    assert model.name == "uni3d" and model.n_points == config.n_points and model.image_tower is None


def test_mapping_errors_name_the_keys(gen, tmp_path):
    official = _official_from(_tiny_encoder(gen), gen)["module"]
    broken = dict(official)
    del broken["module.point_encoder.encoder2trans.bias"]
    broken["module.point_encoder.visual.blocks.9.norm1.weight"] = torch.ones(32)
    with pytest.raises(KeyError, match=r"encoder2trans\.bias.*blocks\.9\.norm1\.weight"):
        uni3d_state_dict(broken, TINY_UNI3D)
    with pytest.raises(ValueError, match="encoder2trans.weight"):
        uni3d_state_dict(official, Uni3DConfig(**{**TINY_UNI3D.__dict__, "encoder_dim": 16}))
    # timm token-pooling layout: the class-token LayerNorm is 'visual.norm' instead of 'visual.fc_norm'
    token_pool = {k.replace("visual.fc_norm.", "visual.norm."): v for k, v in official.items()}
    assert torch.equal(uni3d_state_dict(token_pool, TINY_UNI3D)["fc_norm.weight"],
                       official["module.point_encoder.visual.fc_norm.weight"])
    with pytest.raises(KeyError, match="q_proj"):  # a Uni3D-g file loaded with an EVA02 (l/b) config
        uni3d_state_dict(official, TINY_UNI3D_SWIGLU)
    with pytest.raises(FileNotFoundError, match="uni3d-g/model.pt"):
        Uni3DAlignment.from_checkpoint(str(tmp_path / "missing.pt"), config=TINY_UNI3D)


def _fps_kernel_reference(xyz: np.ndarray, m: int) -> list[int]:
    """pointnet2_ops sampling_gpu.cu rule: start at 0, skip points with |p|^2 <= 1e-3, greedy farthest."""
    eligible = (xyz ** 2).sum(1) > 1e-3
    chosen, dist = [0], np.full(len(xyz), 1e10)
    for _ in range(m - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        best, besti = -1.0, 0
        for k in range(len(xyz)):
            if eligible[k] and dist[k] > best:
                best, besti = dist[k], k
        chosen.append(besti)
    return chosen


def test_encoder_against_float64_reference(gen):
    c = TINY_UNI3D_SWIGLU
    enc = _tiny_encoder(gen, c).double()
    p = f64(enc.state_dict())
    pts = torch.cat([normalise_unit_sphere(_cloud(gen)[..., :3].double()), torch.rand(2, 200, 3, generator=gen,
                                                                                         dtype=torch.float64)], -1)

    def conv_bn_relu(x, pre):  # x [..., C] channels last
        h = x @ p[pre + "0.weight"][..., 0].T + p[pre + "0.bias"]
        h = (h - p[pre + "1.running_mean"]) / torch.sqrt(p[pre + "1.running_var"] + 1e-5)
        h = torch.relu(h * p[pre + "1.weight"] + p[pre + "1.bias"])
        return h @ p[pre + "3.weight"][..., 0].T + p[pre + "3.bias"]

    out = []
    for b in range(2):
        xyz = pts[b, :, :3]
        centers_idx = _fps_kernel_reference(xyz.numpy(), c.num_group)
        tokens, centers = [], xyz[centers_idx]
        for ctr in centers:
            nn_idx = ((xyz - ctr) ** 2).sum(1).argsort()[: c.group_size]
            feat = torch.cat([xyz[nn_idx] - ctr, pts[b, nn_idx, 3:]], 1)
            f = conv_bn_relu(feat, "encoder.first_conv.")
            f = torch.cat([f.max(0).values.expand_as(f), f], 1)
            tokens.append(conv_bn_relu(f, "encoder.second_conv.").max(0).values)
        x = torch.stack(tokens) @ p["encoder2trans.weight"].T + p["encoder2trans.bias"]
        pos = gelu(centers @ p["pos_embed.0.weight"].T + p["pos_embed.0.bias"]) @ p["pos_embed.2.weight"].T \
            + p["pos_embed.2.bias"]
        x = torch.cat([p["cls_token"][0], x]) + torch.cat([p["cls_pos"][0], pos])
        x = x[None]
        for i in range(c.depth):
            x = block(x, p, f"blocks.{i}.", c.num_heads, c.fused_qkv, c.swiglu, post_norm=False)
        x = layer_norm(x[0, 0], p["fc_norm.weight"], p["fc_norm.bias"])
        out.append(x @ p["trans2embed.weight"].T + p["trans2embed.bias"])
    with torch.no_grad():
        torch.testing.assert_close(enc(pts), torch.stack(out), atol=1e-10, rtol=1e-8)


def test_embedding_properties(gen):
    model = Uni3DAlignment(_tiny_encoder(gen), EvaClipImageTower(TINY_EVA_CLIP))
    pts = _cloud(gen)
    emb = model.encode_points(pts)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    # Order of the points: the official FPS starts at point 0, so permute all points but that one.
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(199, generator=gen)])
    torch.testing.assert_close(model.encode_points(pts[:, perm]), emb, atol=1e-5, rtol=0)
    # pc_norm: invariant to translation and uniform scale of the shape (colours untouched).
    moved = torch.cat([pts[..., :3] * 3.7 + torch.tensor([5.0, -2.0, 0.5]), pts[..., 3:]], -1)
    torch.testing.assert_close(model.encode_points(moved), emb, atol=1e-4, rtol=0)
    # Colours and geometry both matter.
    grey = torch.cat([pts[..., :3], torch.full_like(pts[..., 3:], 0.4)], -1)
    assert (model.encode_points(grey) - emb).abs().max() > 1e-3
    # Images and points land in one space: score = cosine similarity in [-1, 1].
    score = model.score(pts, [np.full((30, 30, 3), 128, np.uint8)] * 2)
    assert score.shape == (2,) and score.abs().max() <= 1 + 1e-6


def test_patches_are_centred_neighbourhoods(gen):
    enc = _tiny_encoder(gen)
    pts = _cloud(gen)
    patches, centers = enc.group(pts)
    c = TINY_UNI3D
    assert patches.shape == (2, c.num_group, c.group_size, 6) and centers.shape == (2, c.num_group, 3)
    idx = farthest_point_sample(pts[..., :3], c.num_group, POINTNET2_SKIP_SQ_NORM)
    torch.testing.assert_close(centers, gather(pts[..., :3], idx))
    # each patch holds its center (distance 0) and the K nearest points' colours
    assert patches[..., :3].norm(dim=-1).amin(-1).max() < 1e-6
