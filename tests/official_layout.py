"""Official Direct3D-S2 checkpoint layouts written from the design digest (official_direct3d_s2.md §1-§5, §8),
independently of d3ds2's models: name -> shape tables per model, and tiny release folders of random tensors."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from d3ds2.official.config import release_config


def _lin(d, name, out, inp, bias=True):
    d[f"{name}.weight"] = (out, inp)
    if bias:
        d[f"{name}.bias"] = (out,)


def _conv(d, name, out, inp, k, bias=True):
    d[f"{name}.weight"] = (out, inp, k, k, k)
    if bias:
        d[f"{name}.bias"] = (out,)


def _norm(d, name, c):
    d[f"{name}.weight"], d[f"{name}.bias"] = (c,), (c,)


def _ts_conv(d, name, cin, cout, k=3):
    """torchsparse conv: kernel [k³, Cin, Cout] ([Cin, Cout] for 1x1) + bias."""
    d[f"{name}.conv.kernel"] = (k**3, cin, cout) if k > 1 else (cin, cout)
    d[f"{name}.conv.bias"] = (cout,)


def dense_vae(p: dict) -> dict:
    d: dict = {}
    enc, dec, lat = p["model_channels_encoder"], p["model_channels_decoder"], p["embed_dim"]
    _conv(d, "encoder.input_layer", enc[0], 1, 3)
    i = 0
    for s, c in enumerate(enc):
        for _ in range(p["num_res_blocks_encoder"]):
            _res(d, f"encoder.blocks.{i}", c)
            i += 1
        if s + 1 < len(enc):
            _conv(d, f"encoder.blocks.{i}.conv", enc[s + 1], c, 2)
            i += 1
    for j in range(p["num_res_blocks_middle_encoder"]):
        _res(d, f"encoder.middle_block.{j}", enc[-1])
    _norm(d, "encoder.out_layer.0", enc[-1])
    _conv(d, "encoder.out_layer.2", 2 * lat, enc[-1], 3)
    _conv(d, "decoder.input_layer", dec[0], lat, 3)
    for j in range(p["num_res_blocks_middle_decoder"]):
        _res(d, f"decoder.middle_block.{j}", dec[0])
    i = 0
    for s, c in enumerate(dec):
        for _ in range(p["num_res_blocks_decoder"]):
            _res(d, f"decoder.blocks.{i}", c)
            i += 1
        if s + 1 < len(dec):
            _conv(d, f"decoder.blocks.{i}.conv", dec[s + 1] * 8, c, 3)
            i += 1
    _norm(d, "decoder.out_layer.0", dec[-1])
    _conv(d, "decoder.out_layer.2", 1, dec[-1], 3)
    return d


def _res(d, name, c):
    _norm(d, f"{name}.norm1", c)
    _conv(d, f"{name}.conv1", c, c, 3)
    _norm(d, f"{name}.norm2", c)
    _conv(d, f"{name}.conv2", c, c, 3)


def _dit_common(d, c, cin):
    _lin(d, "t_embedder.mlp.0", c, 256)
    _lin(d, "t_embedder.mlp.2", c, c)
    _lin(d, "input_layer", c, cin)


def _dit_tail(d, name, c, cond, ratio):
    _norm(d, f"{name}.norm2", c)
    _lin(d, f"{name}.cross_attn.to_q", c, c)
    _lin(d, f"{name}.cross_attn.to_kv", 2 * c, cond)
    _lin(d, f"{name}.cross_attn.to_out", c, c)
    _lin(d, f"{name}.mlp.mlp.0", int(ratio * c), c)
    _lin(d, f"{name}.mlp.mlp.2", c, int(ratio * c))
    _lin(d, f"{name}.adaLN_modulation.1", 6 * c, c)


def dense_dit(p: dict) -> dict:
    d: dict = {}
    c, h, r = p["model_channels"], p["num_heads"], p["resolution"]
    d["pos_emb"] = (r**3, c)
    _dit_common(d, c, p["in_channels"])
    for b in range(p["num_blocks"]):
        n = f"blocks.{b}"
        _lin(d, f"{n}.self_attn.to_qkv", 3 * c, c)
        d[f"{n}.self_attn.q_rms_norm.gamma"] = (h, c // h)
        d[f"{n}.self_attn.k_rms_norm.gamma"] = (h, c // h)
        _lin(d, f"{n}.self_attn.to_out", c, c)
        _dit_tail(d, n, c, p["cond_channels"], p.get("mlp_ratio", 4))
    _lin(d, "out_layer", p["out_channels"], c)
    return d


def sparse_vae(p: dict) -> dict:
    d: dict = {}
    c, lat = p["model_channels_encoder"], p["embed_dim"]
    widths = (c // 16, c // 8, c // 4, c)
    _lin(d, "encoder.input_layer1", widths[0], 1)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        n = f"encoder.downsample.{i}"
        _norm(d, f"{n}.act_layers.0", a)
        _ts_conv(d, f"{n}.out_layers.0", a, b)
        _norm(d, f"{n}.out_layers.1", b)
        _ts_conv(d, f"{n}.out_layers.3", b, b)
        _ts_conv(d, f"{n}.skip_connection", a, b, k=1)
    _lin(d, "encoder.input_layer", c, c)
    for part in ("encoder", "decoder"):
        if part == "decoder":
            _lin(d, "decoder.input_layer", c, lat)
        for j in range(p[f"num_blocks_{part}"]):
            n = f"{part}.blocks.{j}"
            _lin(d, f"{n}.attn.to_qkv", 3 * c, c)
            _lin(d, f"{n}.attn.to_out", c, c)
            _lin(d, f"{n}.mlp.mlp.0", 4 * c, c)
            _lin(d, f"{n}.mlp.mlp.2", c, 4 * c)
        if part == "encoder":
            _lin(d, "encoder.out_layer", 2 * lat, c)
    up = (c, c // 4, c // 8, c // 16)
    for i, (a, b) in enumerate(zip(up[:-1], up[1:])):
        _ts_conv(d, f"decoder.upsample.{i}.act_layers.0", a, b)
        _ts_conv(d, f"decoder.upsample.{i}.out_layers.0", b, b)
    _lin(d, "decoder.out_layer", 1, c // 16)
    return d


def sparse_dit(p: dict) -> dict:
    d: dict = {}
    c, h, hkv = p["model_channels"], p["num_heads"], p["num_kv_heads"]
    kv, cb = hkv * (c // h), p["compression_block_size"]
    _dit_common(d, c, p["in_channels"])
    if p["sparse_conditions"]:
        _lin(d, "cond_proj", c, p["cond_channels"])
    cond = c if p["sparse_conditions"] else p["cond_channels"]
    for b in range(p["num_blocks"]):
        n = f"blocks.{b}.self_attn"
        _lin(d, f"{n}.proj_q", c, c, bias=False)
        _lin(d, f"{n}.proj_k", kv, c, bias=False)
        _lin(d, f"{n}.proj_v", kv, c, bias=False)
        _lin(d, f"{n}.proj_o", c, c, bias=False)
        d[f"{n}.intra_block_pe"] = (cb, cb, cb, kv)
        d[f"{n}.gate.0.weight"] = (3, c)
        for m in ("compression_key", "compression_value"):
            if p["compression_version"] == "v1":
                _ts_conv(d, f"{n}.{m}.act_layers.0", kv, kv, k=1)
            else:
                _norm(d, f"{n}.{m}.act_layers.0", kv)
                d[f"{n}.{m}.out_layers.0.conv.kernel"], d[f"{n}.{m}.out_layers.0.conv.bias"] = (27, kv, kv), (kv,)
                _norm(d, f"{n}.{m}.out_layers.1", kv)
                d[f"{n}.{m}.out_layers.3.conv.kernel"], d[f"{n}.{m}.out_layers.3.conv.bias"] = (27, kv, kv), (kv,)
        _dit_tail(d, f"blocks.{b}", c, cond, p.get("mlp_ratio", 4))
    _lin(d, "out_layer", p["out_channels"], c)
    return d


def _unet(d, cin, ch, lpb, lmid):
    def resnet(name, a, b):
        _norm(d, f"{name}.norm1", a)
        _conv(d, f"{name}.conv1", b, a, 3)
        _norm(d, f"{name}.norm2", b)
        _conv(d, f"{name}.conv2", b, b, 3)
        if a != b:
            _conv(d, f"{name}.conv_shortcut", b, a, 1)

    u = "unet3d1"
    _conv(d, f"{u}.conv_in", ch[0], cin, 3)
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(lpb):
            resnet(f"{u}.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        if i + 1 < len(ch):
            _conv(d, f"{u}.down_blocks.{i}.downsamplers.0.conv", c, c, 2)
        prev = c
    for j in range(1 + lmid):
        resnet(f"{u}.mid_block.resnets.{j}", prev, prev)
    rev = ch[::-1]
    prev = rev[0]
    for i, c in enumerate(rev):
        skip = rev[min(i + 1, len(rev) - 1)]
        for j in range(lpb + 1):
            resnet(f"{u}.up_blocks.{i}.resnets.{j}", (prev if j == 0 else c) + (skip if j == lpb else c), c)
        if i + 1 < len(rev):
            d[f"{u}.up_blocks.{i}.upsamplers.0.conv.weight"] = (c, c, 2, 2, 2)  # ConvTranspose3d [Cin, Cout, ...]
            d[f"{u}.up_blocks.{i}.upsamplers.0.conv.bias"] = (c,)
        prev = c
    _norm(d, f"{u}.conv_norm_out", ch[0])


def refiner(p: dict) -> dict:
    d: dict = {}
    ch = tuple(p.get("block_out_channels", (8, 32, 128, 512)))
    w = ch[0]
    _unet(d, 2 * w, ch, p["layers_per_block"], p["layers_mid_block"])
    _conv(d, "conv_in", w, 1, 3)
    f = p.get("feature_channels", 32)  # the 512 VAE decoder's last width (C / 16)
    for i, (a, b) in enumerate(((f, f), (f, f), (f, f), (f, w))):
        _lin(d, f"latent_mlp.net.{2 * i}", b, a)
    for k in (1, 2, 3):
        _conv(d, f"adaptive_conv{k}.0", w, w, 3)
        _conv(d, f"adaptive_conv{k}.2", 27, w, 3, bias=False)
    _conv(d, "mid_conv", w, w, 3)
    _conv(d, "conv_out", 1, w, 3)
    return d


def refiner_1024(p: dict) -> dict:
    d: dict = {}
    ch = tuple(p.get("block_out_channels", (8, 32, 128, 512)))
    _unet(d, ch[0], ch, p["layers_per_block"], p["layers_mid_block"])
    _conv(d, "conv_in", ch[0], 1, 3)
    _conv(d, "conv_out", 1, ch[0], 3)
    return d


LAYOUTS = {"dense_vae": dense_vae, "dense_dit": dense_dit, "sparse_vae_512": sparse_vae, "sparse_vae_1024": sparse_vae,
           "sparse_dit_512": sparse_dit, "sparse_dit_1024": sparse_dit, "refiner": refiner, "refiner_1024": refiner_1024}
FILES = {"model_dense.ckpt": {"vae": "dense_vae", "dit": "dense_dit"},
         "model_sparse_512.ckpt": {"vae": "sparse_vae_512", "dit": "sparse_dit_512"},
         "model_sparse_1024.ckpt": {"vae": "sparse_vae_1024", "dit": "sparse_dit_1024"},
         "model_refiner.ckpt": {"refiner": "refiner"}, "model_refiner_1024.ckpt": {"refiner": "refiner_1024"}}


def layout(config: dict, section: str) -> dict[str, tuple]:
    return LAYOUTS[section](config[section]["params"])


def tiny_config(version: str = "v1.1", cond_channels: int = 64) -> dict:
    """A release config.yaml at small widths (same structure; index grid 4³, 512 stage at fine 32, 1024 at 64)."""
    cfg = copy.deepcopy(release_config(version))
    cfg["dense_vae"]["params"].update(model_channels_encoder=[8, 16, 32], model_channels_decoder=[32, 16, 8],
                                      num_res_blocks_encoder=1, num_res_blocks_decoder=1,
                                      num_res_blocks_middle_encoder=1, num_res_blocks_middle_decoder=1)
    cfg["dense_dit"]["params"].update(resolution=1, model_channels=32, cond_channels=cond_channels, num_blocks=2, num_heads=2,
                                      latent_shape=[8, 1, 1, 1])
    for res in ("512", "1024"):
        cfg[f"sparse_vae_{res}"]["params"].update(model_channels_encoder=64, model_channels_decoder=64, num_heads_encoder=2,
                                                  num_heads_decoder=2, num_blocks_encoder=2, num_blocks_decoder=2)
        # head dim 16 -> 32 KV channels (the v2 compression's GroupNorm has 32 groups)
        cfg[f"sparse_dit_{res}"]["params"].update(model_channels=64, cond_channels=cond_channels, num_blocks=2, num_heads=4,
                                                  ssa_backend="torch")  # not the Triton interpreter on the CPU
    for sec, res in (("sparse_vae_512", 4), ("sparse_dit_512", 4), ("sparse_vae_1024", 8), ("sparse_dit_1024", 8)):
        cfg[sec]["params"]["resolution"] = res
    cfg["refiner"]["params"].update(block_out_channels=[4, 8], patch_size=12, feature_channels=4)  # 3 x 12 at stride 10 tile 32
    cfg["refiner_1024"]["params"].update(block_out_channels=[4, 8], patch_size=16)  # 3 x 16 at stride 8 tile the half grid 32
    return cfg


def random_state(shapes: dict[str, tuple], gen: torch.Generator, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random tensors: norms (1-D weights) near 1, float16 for >= 2-D weights (as use_fp16 stores them)."""
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=gen) * scale
        if k.endswith(("norm1.weight", "norm2.weight", ".gamma")) or (len(s) == 1 and "norm" in k and k.endswith("weight")):
            t = 1 + t
        out[k] = t.half() if len(s) >= 2 and k != "pos_emb" else t
    return out


def write_release(folder: Path, config: dict, gen: torch.Generator) -> dict[str, dict]:
    """Write config.yaml + the five checkpoints of random official-layout tensors; returns file -> top dict."""
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    written = {}
    for fname, keys in FILES.items():
        ckpt = {key: random_state(layout(config, sec), gen) for key, sec in keys.items()}
        torch.save(ckpt, folder / fname)
        written[fname] = ckpt
    return written
