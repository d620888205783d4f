"""OpenShape point encoder: the released checkpoint's key list / shapes, the key mapping, and the forward pass
against a plain float64 reference written from the official module structure (Colin97/OpenShape_code
src/models/ppat.py, src/models/pointnet_util.py)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from d3ds2.eval.alignment.image_tower import ClipImageTower
from d3ds2.eval.alignment.openshape import (OPENSHAPE_G14, OPENSHAPE_TINY, OpenShapeAlignment, OpenShapeConfig,
                                            OpenShapePointEncoder, ball_query, openshape_state_dict)

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=OPENSHAPE_TINY.embed_dim)


def official_shapes(c: OpenShapeConfig) -> dict[str, tuple]:
    """Keys and shapes of ``model.pt['state_dict']`` for PointPatchTransformer(dim, depth, heads, mlp_dim, sa_dim,
    patches, prad, nsamp, in_dim) wrapped in Projected(ppat, Linear(dim, embed)) under DistributedDataParallel."""
    s = {"module.ppat.cls_token": (c.dim,)}
    widths = [3 + c.in_dim, 64, 64, c.sa_dim]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        s[f"module.ppat.sa.mlp_convs.{i}.weight"] = (b, a, 1, 1)
        s[f"module.ppat.sa.mlp_convs.{i}.bias"] = (b,)
        for n in ("weight", "bias", "running_mean", "running_var"):
            s[f"module.ppat.sa.mlp_bns.{i}.{n}"] = (b,)
        s[f"module.ppat.sa.mlp_bns.{i}.num_batches_tracked"] = ()
    s["module.ppat.lift.0.weight"] = (c.dim, c.sa_dim + 3, 1)
    s["module.ppat.lift.0.bias"] = (c.dim,)
    s["module.ppat.lift.2.weight"] = s["module.ppat.lift.2.bias"] = (c.dim,)
    inner = c.heads * c.dim_head
    for i in range(c.depth):
        p = f"module.ppat.transformer.layers.{i}"
        s[f"{p}.0.norm.weight"] = s[f"{p}.0.norm.bias"] = (c.dim,)
        s[f"{p}.0.fn.to_qkv.weight"] = (3 * inner, c.dim)
        s[f"{p}.0.fn.to_out.0.weight"] = (c.dim, inner)
        s[f"{p}.0.fn.to_out.0.bias"] = (c.dim,)
        s[f"{p}.1.norm.weight"] = s[f"{p}.1.norm.bias"] = (c.dim,)
        s[f"{p}.1.fn.net.0.weight"] = (c.mlp_dim, c.dim)
        s[f"{p}.1.fn.net.0.bias"] = (c.mlp_dim,)
        s[f"{p}.1.fn.net.3.weight"] = (c.dim, c.mlp_dim)
        s[f"{p}.1.fn.net.3.bias"] = (c.dim,)
    s["module.proj.weight"] = (c.embed_dim, c.dim)
    s["module.proj.bias"] = (c.embed_dim,)
    return s


def to_official(ours: dict) -> dict:
    """Our state dict -> official key names (written independently of the module's rename table)."""
    out = {}
    for k, v in ours.items():
        parts = k.split(".")
        if k.startswith("sa.convs."):
            o = f"ppat.sa.mlp_convs.{parts[2]}.{parts[3]}"
        elif k.startswith("sa.norms."):
            o = f"ppat.sa.mlp_bns.{parts[2]}.{parts[3]}"
        elif k.startswith("lift_conv."):
            o = f"ppat.lift.0.{parts[1]}"
        elif k.startswith("lift_norm."):
            o = f"ppat.lift.2.{parts[1]}"
        elif k == "cls_token":
            o = "ppat.cls_token"
        elif k.startswith("blocks."):
            sub = {"norm1": "0.norm", "attn.qkv": "0.fn.to_qkv", "attn.proj": "0.fn.to_out.0",
                   "norm2": "1.norm", "mlp.fc1": "1.fn.net.0", "mlp.fc2": "1.fn.net.3"}[".".join(parts[2:-1])]
            o = f"ppat.transformer.layers.{parts[1]}.{sub}.{parts[-1]}"
        else:
            assert k.startswith("proj.")
            o = k
        out["module." + o] = v
    return out


def random_encoder(cfg=OPENSHAPE_TINY, seed=0, dtype=torch.float32) -> OpenShapePointEncoder:
    torch.manual_seed(seed)
    enc = OpenShapePointEncoder(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for bn in enc.sa.norms:
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return enc.to(dtype).eval()


def tiny_alignment(enc=None, **kw) -> OpenShapeAlignment:
    return OpenShapeAlignment(enc if enc is not None else random_encoder(), ClipImageTower(config=TINY_TOWER), **kw)


def shape_points(gen, b=2, n=200, dtype=torch.float32):
    xyz = torch.randn(b, n, 3, generator=gen, dtype=dtype) * torch.tensor([1.0, 0.6, 0.3], dtype=dtype)
    return torch.cat([xyz, torch.rand(b, n, 3, generator=gen, dtype=dtype)], -1)


# ---- (a) the released checkpoint's key list and shapes -------------------------------------------------------

def test_full_size_encoder_matches_the_released_checkpoint_keys_and_shapes():
    expected = official_shapes(OPENSHAPE_G14)
    assert len(expected) == 1 + 3 * 7 + 4 + 12 * 11 + 2
    with torch.device("meta"):
        model = OpenShapePointEncoder(OPENSHAPE_G14)
        official = {k: torch.empty(s) for k, s in expected.items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = openshape_state_dict({"state_dict": official, "epoch": 0, "logit_scale": {}}, OPENSHAPE_G14)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    assert to_official(ours) == expected  # the test's own inverse map agrees key for key
    # the hyperparameters of ppat.make scaling 4: SA conv reads 3 + 6 channels, 384 patches of 64 in r=0.2
    assert ours["sa.convs.0.weight"] == (64, 9, 1, 1) and ours["proj.weight"] == (1280, 512)
    assert (OPENSHAPE_G14.n_patches, OPENSHAPE_G14.n_samples, OPENSHAPE_G14.radius) == (384, 64, 0.2)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 32_326_080  # 32.3M, the size the OpenShape paper gives its PointBERT backbone


# ---- (b) key mapping round trip ----------------------------------------------------------------------------

def test_state_dict_round_trip_from_an_official_style_checkpoint(gen, tmp_path):
    enc = random_encoder(seed=1)
    ckpt = {"state_dict": to_official(enc.state_dict()), "logit_scale": {"logit_scale": torch.tensor(4.0)},
            "text_proj": None, "image_proj": None, "epoch": 3, "step": 10}
    fresh = OpenShapePointEncoder(OPENSHAPE_TINY)
    fresh.load_state_dict(openshape_state_dict(ckpt, OPENSHAPE_TINY))
    for k, v in enc.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the whole file through from_checkpoint (weights-only load) gives the same embeddings
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    loaded = OpenShapeAlignment.from_checkpoint(path, image_tower=ClipImageTower(config=TINY_TOWER),
                                                cfg=OPENSHAPE_TINY)
    pts = shape_points(gen)
    torch.testing.assert_close(loaded.encode_points(pts), tiny_alignment(enc).encode_points(pts))


def test_state_dict_errors_name_the_keys(tmp_path):
    official = to_official(random_encoder().state_dict())
    broken = dict(official)
    del broken["module.ppat.transformer.layers.1.0.fn.to_qkv.weight"]
    broken["module.ppat.transformer.layers.0.0.pe.0.weight"] = torch.zeros(64, 3, 1, 1)  # rel_pe: not released
    with pytest.raises(ValueError) as e:
        openshape_state_dict(broken, OPENSHAPE_TINY)
    assert "blocks.1.attn.qkv.weight" in str(e.value) and "layers.0.0.pe.0.weight" in str(e.value)
    wrong = dict(official)
    wrong["module.proj.weight"] = torch.zeros(7, OPENSHAPE_TINY.dim)
    with pytest.raises(ValueError, match="proj.weight"):
        openshape_state_dict(wrong, OPENSHAPE_TINY)
    with pytest.raises(FileNotFoundError, match="OpenShape/openshape-pointbert-vitg14-rgb"):
        OpenShapeAlignment.from_checkpoint(tmp_path / "missing.pt", image_tower=torch.nn.Identity())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        OpenShapeAlignment.from_checkpoint(tmp_path / "junk.pt", image_tower=torch.nn.Identity())


# ---- (c) properties and a float64 reference ----------------------------------------------------------------

def ball_query_reference(xyz, centers, r, k):
    """Per centre: all in-radius indices in increasing order, the first k, padded with the first."""
    out = []
    for b in range(xyz.shape[0]):
        rows = []
        for c in centers[b]:
            inside = [i for i in range(xyz.shape[1]) if ((xyz[b, i] - c) ** 2).sum() <= r * r]
            rows.append((inside + [inside[0]] * k)[:k])
        out.append(rows)
    return torch.tensor(out)


def test_ball_query_keeps_the_lowest_indices_in_range(gen):
    xyz = torch.rand(2, 150, 3, generator=gen, dtype=torch.float64)
    centers = xyz[:, :12]
    for r, k in ((0.15, 6), (0.3, 20), (0.05, 4)):
        assert torch.equal(ball_query(xyz, centers, r, k), ball_query_reference(xyz, centers, r, k))


def reference_embedding(sd: dict, cfg: OpenShapeConfig, points: torch.Tensor) -> torch.Tensor:
    """Float64 OpenShape forward on official key names: y/z swap, unit-sphere normalisation, FPS from index 0,
    lowest-index ball query, SA MLP with eval BatchNorm, lift, CLS token, pre-norm blocks, proj, normalise."""
    sd = {k[len("module."):]: v.double() for k, v in sd.items() if v.is_floating_point()}
    pts = points.double()
    xyz = pts[..., [0, 2, 1]]
    xyz = xyz - xyz.mean(1, keepdim=True)
    xyz = xyz / xyz.norm(dim=-1).max(1).values[:, None, None]
    feats = torch.cat([xyz, pts[..., 3:]], -1)
    outs = []
    for b in range(pts.shape[0]):
        p = xyz[b]
        chosen, dist = [0], torch.full((len(p),), math.inf, dtype=torch.float64)
        for _ in range(cfg.n_patches - 1):
            dist = torch.minimum(dist, ((p - p[chosen[-1]]) ** 2).sum(1))
            chosen.append(int(dist.argmax()))
        centres = p[chosen]
        group = ball_query_reference(p[None], centres[None], cfg.radius, cfg.n_samples)[0]  # [S, K]
        h = torch.cat([p[group] - centres[:, None], feats[b][group]], -1)  # [S, K, 9]
        for i in range(3):
            w, bias = sd[f"ppat.sa.mlp_convs.{i}.weight"][:, :, 0, 0], sd[f"ppat.sa.mlp_convs.{i}.bias"]
            h = h @ w.T + bias
            mean, var = sd[f"ppat.sa.mlp_bns.{i}.running_mean"], sd[f"ppat.sa.mlp_bns.{i}.running_var"]
            gamma, beta = sd[f"ppat.sa.mlp_bns.{i}.weight"], sd[f"ppat.sa.mlp_bns.{i}.bias"]
            h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
            h = h.clamp_min(0)
        h = h.max(1).values  # [S, sa_dim]
        x = torch.cat([centres, h], -1) @ sd["ppat.lift.0.weight"][:, :, 0].T + sd["ppat.lift.0.bias"]

        def ln(t, name):
            return F.layer_norm(t, (cfg.dim,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

        x = torch.cat([sd["ppat.cls_token"][None], ln(x, "ppat.lift.2")], 0)  # [S+1, dim]
        for i in range(cfg.depth):
            pre = f"ppat.transformer.layers.{i}"
            q, k, v = (ln(x, f"{pre}.0.norm") @ sd[f"{pre}.0.fn.to_qkv.weight"].T).chunk(3, -1)
            q, k, v = (t.view(len(x), cfg.heads, cfg.dim_head).transpose(0, 1) for t in (q, k, v))
            att = torch.softmax(q @ k.transpose(1, 2) * cfg.dim_head ** -0.5, -1)
            y = (att @ v).transpose(0, 1).reshape(len(x), -1)
            x = x + y @ sd[f"{pre}.0.fn.to_out.0.weight"].T + sd[f"{pre}.0.fn.to_out.0.bias"]
            y = ln(x, f"{pre}.1.norm") @ sd[f"{pre}.1.fn.net.0.weight"].T + sd[f"{pre}.1.fn.net.0.bias"]
            y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
            x = x + y @ sd[f"{pre}.1.fn.net.3.weight"].T + sd[f"{pre}.1.fn.net.3.bias"]
        e = x[0] @ sd["proj.weight"].T + sd["proj.bias"]
        outs.append(e / e.norm())
    return torch.stack(outs)


def test_encoder_matches_the_float64_reference(gen):
    enc = random_encoder(seed=2, dtype=torch.float64)
    model = tiny_alignment(enc)
    pts = shape_points(gen, b=2, n=160, dtype=torch.float64)
    expect = reference_embedding(to_official(enc.state_dict()), OPENSHAPE_TINY, pts)
    torch.testing.assert_close(model.encode_points(pts), expect, rtol=1e-9, atol=1e-9)
    # float32 model, same weights
    model32 = tiny_alignment(random_encoder(seed=2))
    torch.testing.assert_close(model32.encode_points(pts.float()).double(), expect, rtol=1e-4, atol=1e-4)


def test_embeddings_are_unit_norm_and_depend_on_colour(gen):
    model = tiny_alignment()
    pts = shape_points(gen, b=3)
    e = model.encode_points(pts)
    assert e.shape == (3, OPENSHAPE_TINY.embed_dim)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    recoloured = pts.clone()
    recoloured[..., 3:] = 0.4
    assert (model.encode_points(recoloured) - e).abs().max() > 1e-4


def test_invariant_to_translation_and_scale(gen):
    model = tiny_alignment(random_encoder(dtype=torch.float64))
    pts = shape_points(gen, dtype=torch.float64)
    moved = pts.clone()
    moved[..., :3] = pts[..., :3] * 3.7 + torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(model.encode_points(moved), model.encode_points(pts), rtol=1e-9, atol=1e-9)


def test_y_up_swaps_y_and_z(gen):
    enc = random_encoder()
    pts = shape_points(gen)
    swapped = pts[..., [0, 2, 1, 3, 4, 5]]
    torch.testing.assert_close(tiny_alignment(enc, y_up=True).encode_points(pts),
                               tiny_alignment(enc, y_up=False).encode_points(swapped))


def test_point_order_invariance_when_balls_take_every_point_in_range(gen):
    """FPS starts at point 0 and the ball query keeps the lowest-index in-range points, so the embedding is
    invariant to permutations fixing point 0 when no ball overflows (n_samples >= N here); with overflowing
    balls the kept subset (and the embedding) depends on the order, as in the official code."""
    n = 96
    cfg = dataclasses.replace(OPENSHAPE_TINY, n_samples=n, radius=0.5)
    model = tiny_alignment(random_encoder(cfg, dtype=torch.float64))
    pts = shape_points(gen, n=n, dtype=torch.float64)
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=gen)])
    torch.testing.assert_close(model.encode_points(pts[:, perm]), model.encode_points(pts), rtol=1e-9, atol=1e-9)
    small = tiny_alignment(random_encoder(dtype=torch.float64))  # n_samples 8 of ~dozens in range
    assert (small.encode_points(pts[:, perm]) - small.encode_points(pts)).abs().max() > 1e-6


def test_score_is_the_cosine_of_shape_and_image(gen):
    model = tiny_alignment()
    pts = shape_points(gen, b=2)
    images = [torch.rand(40, 30, 3, generator=gen).numpy() for _ in range(2)]
    s = model.score(pts, images)
    expect = (model.encode_points(pts) * model.encode_images(images)).sum(-1)
    torch.testing.assert_close(s, expect)
    assert s.shape == (2,) and bool((s.abs() <= 1 + 1e-6).all())
