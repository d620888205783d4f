"""Float64 re-implementations of the official Direct3D-S2 forwards, reading official-layout tensors directly
(torchsparse kernels [k³, Cin, Cout], official names), written from the design digest (§1, §2.4, §5).
Sparse data: (feats [N, C], coords [N, 3]) of one sample."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def f64(sd: dict) -> dict:
    return {k: v.double() for k, v in sd.items()}


def lin(x, p, name, bias=True):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias") if bias else None)


def _pack(c: torch.Tensor) -> torch.Tensor:
    c = c.long() + 4
    return (c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]


def ts_conv(feats, coords, p, name):
    """torchsparse submanifold conv: out[u] = sum_k in[u + off_k] @ kernel[k] (+ bias), offsets x fastest."""
    kernel = p[f"{name}.conv.kernel"]
    out = feats.new_zeros(feats.shape[0], kernel.shape[-1])
    if kernel.dim() == 2:
        out = feats @ kernel
    else:
        keys = _pack(coords)
        order = keys.argsort()
        sk = keys[order]
        k = round(kernel.shape[0] ** (1 / 3))
        r = range(-(k // 2), k // 2 + 1)
        for idx, (dz, dy, dx) in enumerate(itertools.product(r, r, r)):
            q = _pack(coords + torch.tensor([dx, dy, dz]))
            pos = torch.searchsorted(sk, q).clamp(max=len(sk) - 1)
            hit = sk[pos] == q
            out[hit] += feats[order[pos[hit]]] @ kernel[idx]
    return out + p[f"{name}.conv.bias"]


def group_norm(x, p, name, groups, eps=1e-5):
    """GroupNorm over the voxels of a sample: x [N, C]."""
    n, c = x.shape
    h = x.t().reshape(groups, -1)
    h = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + eps)
    return h.reshape(c, n).t() * p[f"{name}.weight"] + p[f"{name}.bias"]


def mean_pool(feats, coords, f=2):
    parent, inv = torch.unique(torch.div(coords, f, rounding_mode="floor"), dim=0, return_inverse=True)
    out = feats.new_zeros(len(parent), feats.shape[1]).index_add_(0, inv, feats)
    return out / torch.bincount(inv)[:, None], parent


def ape(coords, channels):
    """Official APE: per axis [sin(p f), cos(p f)] with freq_dim = C // 3 // 2 frequencies, zero padded."""
    fd = channels // 3 // 2
    freqs = 1.0 / 10000 ** (torch.arange(fd, dtype=torch.float64) / fd)
    a = coords.double()[:, :, None] * freqs
    emb = torch.cat([a.sin(), a.cos()], -1).reshape(len(coords), -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


def swin_block(x, coords, p, name, heads, shift, window=8):
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    n, c = h.shape
    q, k, v = lin(h, p, f"{name}.attn.to_qkv").view(n, 3, heads, c // heads).unbind(1)
    w = torch.div(coords + shift, window, rounding_mode="floor")
    mask = (w[:, None] == w[None]).all(-1)
    s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(c // heads)
    o = torch.einsum("hnm,mhd->nhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v).reshape(n, c)
    x = x + lin(o, p, f"{name}.attn.to_out")
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return x + lin(F.gelu(lin(h, p, f"{name}.mlp.mlp.0"), approximate="tanh"), p, f"{name}.mlp.mlp.2")


def sparse_vae_encode(p, feats, coords, heads, blocks, groups):
    """Fine SDF (feats [N, 1], coords [N, 3]) -> posterior mean [M, L] at coords // 8 (sorted unique)."""
    h = lin(feats, p, "encoder.input_layer1")
    for i in range(3):
        n = f"encoder.downsample.{i}"
        a = F.silu(group_norm(h, p, f"{n}.act_layers.0", groups[i]))
        a, parent = mean_pool(a, coords)
        a = ts_conv(a, parent, p, f"{n}.out_layers.0")
        a = ts_conv(F.silu(group_norm(a, p, f"{n}.out_layers.1", groups[i + 1])), parent, p, f"{n}.out_layers.3")
        skip, _ = mean_pool(h, coords)
        h, coords = a + ts_conv(skip, parent, p, f"{n}.skip_connection"), parent
    c = p["encoder.input_layer.weight"].shape[0]
    h = lin(h, p, "encoder.input_layer") + ape(coords, c)
    for j in range(blocks):
        h = swin_block(h, coords, p, f"encoder.blocks.{j}", heads, 0 if j % 2 == 0 else 4)
    out = lin(F.layer_norm(h, h.shape[-1:], eps=1e-5), p, "encoder.out_layer")
    return out[:, : out.shape[1] // 2], coords


def sparse_vae_decode(p, z, coords, heads, blocks):
    """Latent [M, L] at coords [M, 3] -> (tanh SDF [8³ M], fine coords [8³ M, 3]), children 2c + {0,1}³."""
    c = p["decoder.input_layer.weight"].shape[0]
    h = lin(z, p, "decoder.input_layer") + ape(coords, c)
    for j in range(blocks):
        h = swin_block(h, coords, p, f"decoder.blocks.{j}", heads, 0 if j % 2 == 0 else 4)
    child = torch.tensor(list(itertools.product((0, 1), repeat=3)))
    for i in range(3):
        n = f"decoder.upsample.{i}"
        h = F.silu(ts_conv(h, coords, p, f"{n}.act_layers.0"))
        coords = (2 * coords[:, None] + child).reshape(-1, 3)
        h = h.repeat_interleave(8, 0)
        h = F.silu(ts_conv(h, coords, p, f"{n}.out_layers.0"))
    return torch.tanh(lin(h, p, "decoder.out_layer"))[:, 0], coords


def compression(p, name, x, coords, cb, version, groups=32):
    """SSA compression of x [N, kv] (already + PE for keys) -> ([Nc, kv], block coords [Nc, 3] sorted unique)."""
    if version == "v1":
        h = F.silu(x @ p[f"{name}.act_layers.0.conv.kernel"] + p[f"{name}.act_layers.0.conv.bias"])
        return mean_pool(h, coords, cb)
    h, blocks = mean_pool(F.silu(group_norm(x, p, f"{name}.act_layers.0", groups)), coords, cb)
    h = ts_conv(h, blocks, p, f"{name}.out_layers.0")
    h = ts_conv(F.silu(group_norm(h, p, f"{name}.out_layers.1", groups)), blocks, p, f"{name}.out_layers.3")
    return mean_pool(x, coords, cb)[0] + h, blocks


# ------------------------------------------------------------------------------------------------- refiners
def conv3d(x, p, name, **kw):
    return F.conv3d(x, p[f"{name}.weight"], p.get(f"{name}.bias"), padding=kw.get("padding", 1), stride=kw.get("stride", 1))


def gn(x, p, name, groups=4, eps=1e-5):
    return F.group_norm(x, groups, p[f"{name}.weight"], p[f"{name}.bias"], eps)


def resnet(x, p, name):
    h = conv3d(F.silu(gn(x, p, f"{name}.norm1")), p, f"{name}.conv1")
    h = conv3d(F.silu(gn(h, p, f"{name}.norm2")), p, f"{name}.conv2")
    if f"{name}.conv_shortcut.weight" in p:
        x = conv3d(x, p, f"{name}.conv_shortcut", padding=0)
    return x + h


def unet(x, p, stages, lpb=2, lmid=2):
    u = "unet3d1"
    h = conv3d(x, p, f"{u}.conv_in")
    skips = [h]
    for i in range(stages):
        for j in range(lpb):
            h = resnet(h, p, f"{u}.down_blocks.{i}.resnets.{j}")
            skips.append(h)
        if i + 1 < stages:
            h = conv3d(h, p, f"{u}.down_blocks.{i}.downsamplers.0.conv", padding=0, stride=2)
            skips.append(h)
    for j in range(1 + lmid):
        h = resnet(h, p, f"{u}.mid_block.resnets.{j}")
    for i in range(stages):
        for j in range(lpb + 1):
            h = resnet(torch.cat([h, skips.pop()], 1), p, f"{u}.up_blocks.{i}.resnets.{j}")
        if i + 1 < stages:
            n = f"{u}.up_blocks.{i}.upsamplers.0.conv"
            h = F.conv_transpose3d(h, p[f"{n}.weight"], p[f"{n}.bias"], stride=2)
    return F.silu(gn(h, p, f"{u}.conv_norm_out"))


def adaptive(x, p, name, src):
    w = conv3d(F.relu(conv3d(src, p, f"{name}.0")), p, f"{name}.2")
    w = w / w.abs().sum(1, keepdim=True).clamp_min(1e-12)
    size = x.shape[-1]
    for _ in range(3):
        pad = F.pad(x, (1,) * 6)
        out = torch.zeros_like(x)
        for i, j, k in itertools.product(range(3), repeat=3):
            out = out + pad[:, :, i:i + size, j:j + size, k:k + size] * w[:, i * 9 + j * 3 + k][:, None]
        x = out
    return x


def refiner_xl(p, sdf, feats, stages):
    """sdf [B, 1, P³], feats [B, 32, P³] -> tanh [B, 1, P³] (official Voxel_RefinerXL patch forward)."""
    lat = torch.stack([lin(lin(lin(lin(f, p, "latent_mlp.net.0").relu(), p, "latent_mlp.net.2").relu(), p,
                                   "latent_mlp.net.4").relu(), p, "latent_mlp.net.6") for f in [feats.movedim(1, -1)]])[0]
    h = unet(torch.cat([conv3d(sdf, p, "conv_in"), lat.movedim(-1, 1)], 1), p, stages)
    h = adaptive(h, p, "adaptive_conv1", h)
    h = conv3d(h, p, "mid_conv")
    h = adaptive(h, p, "adaptive_conv2", h)
    return torch.tanh(adaptive(conv3d(h, p, "conv_out"), p, "adaptive_conv3", h))


def refiner_sign(p, sdf, stages):
    return torch.where(torch.sigmoid(conv3d(unet(conv3d(sdf, p, "conv_in"), p, stages), p, "conv_out")) >= 0.5, 1.0, -1.0)


def blend_official(patches, starts, size, res):
    """Official XL stitching of 3x3x3 patches (list in i, j, k order): along z, then y, then x, with linear
    ramps over the overlaps and plain copies elsewhere."""
    s, o = starts[1], size - starts[1]
    w = torch.linspace(0, 1, o, dtype=torch.float64)

    def join(a, b, c, dim):
        def sl(t, lo, hi):
            return t.narrow(dim, lo, hi - lo)
        shape = [1] * 3
        shape[dim] = -1
        ww = w.view(shape)
        return torch.cat([sl(a, 0, s), sl(a, s, size) * (1 - ww) + sl(b, 0, o) * ww, sl(b, o, s),
                          sl(b, s, size) * (1 - ww) + sl(c, 0, o) * ww, sl(c, o, size)], dim)

    lines = [join(*patches[3 * i:3 * i + 3], 2) for i in range(9)]
    layers = [join(*lines[3 * i:3 * i + 3], 1) for i in range(3)]
    out = join(*layers, 0)
    assert out.shape == (res, res, res)
    return out


# ------------------------------------------------------------------------------------------------- sparse DiT
def timestep_embedding(t: float, p) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    a = t * freqs
    return lin(F.silu(lin(torch.cat([a.cos(), a.sin()])[None], p, "t_embedder.mlp.0")), p, "t_embedder.mlp.2")


def ssa(p, name, x, coords, heads, kv_heads, cb, sb, topk, version, shift, window=8):
    """Brute-force SSA of one sample (official semantics, §2.4) from official tensors."""
    n, c = x.shape
    d = c // heads
    g = heads // kv_heads
    q = lin(x, p, f"{name}.proj_q", bias=False).view(n, kv_heads, g, d)
    k, v = lin(x, p, f"{name}.proj_k", bias=False), lin(x, p, f"{name}.proj_v", bias=False)
    pos = coords % cb
    k_pe = k + p[f"{name}.intra_block_pe"][pos[:, 0], pos[:, 1], pos[:, 2]]
    k_cmp, blocks = compression(p, f"{name}.compression_key", k_pe, coords, cb, version)
    v_cmp, _ = compression(p, f"{name}.compression_value", v, coords, cb, version)
    k_cmp, v_cmp = k_cmp.view(-1, kv_heads, d), v_cmp.view(-1, kv_heads, d)
    prob = (torch.einsum("nhgd,chd->nhgc", q, k_cmp) / math.sqrt(d)).softmax(-1)
    o_cmp = torch.einsum("nhgc,chd->nhgd", prob, v_cmp)
    sblocks, slc_of_cmp = torch.unique(torch.div(blocks, sb // cb, rounding_mode="floor"), dim=0, return_inverse=True)
    score = torch.einsum("nhgc,cs->nhs", prob, F.one_hot(slc_of_cmp, len(sblocks)).double())
    top = score.topk(min(topk, len(sblocks)), -1).indices
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    slc_of_token = torch.unique(torch.div(coords, sb, rounding_mode="floor"), dim=0, return_inverse=True)[1]
    kk, vv = k.view(n, kv_heads, d), v.view(n, kv_heads, d)
    s = torch.einsum("nhgd,mhd->nhgm", q, kk) / math.sqrt(d)
    o_slc = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~chosen[:, :, slc_of_token][:, :, None], float("-inf")).softmax(-1), vv)
    w = torch.div(coords + shift, window, rounding_mode="floor")
    same = (w[:, None] == w[None]).all(-1)
    o_win = torch.einsum("nhgm,mhd->nhgd", s.masked_fill(~same[:, None, None], float("-inf")).softmax(-1), vv)
    gate = torch.sigmoid(x @ p[f"{name}.gate.0.weight"].t())[:, :, None, None, None]
    o = gate[:, 0] * o_cmp + gate[:, 1] * o_slc + gate[:, 2] * o_win
    return lin(o.reshape(n, c), p, f"{name}.proj_o", bias=False)


def sparse_dit(p, params, feats, coords, t, cond, cond_pos=None):
    """One sample: feats [N, 16] at latent coords [N, 3], t on the 0..1000 scale, cond [L, Cc] (dense tokens, or
    sparse foreground tokens with integer positions cond_pos [L, 3] when sparse_conditions) -> velocity [N, 16]."""
    c, heads = params["model_channels"], params["num_heads"]
    h = lin(feats, p, "input_layer") + ape(coords * params["factor"], c)
    t_emb = timestep_embedding(t, p)
    if params["sparse_conditions"]:
        cond = lin(cond, p, "cond_proj") + ape(cond_pos, c)
    for b in range(params["num_blocks"]):
        n = f"blocks.{b}"
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = lin(F.silu(t_emb), p, f"{n}.adaLN_modulation.1").chunk(6, 1)
        x = F.layer_norm(h, (c,), eps=1e-6) * (1 + sc_a) + sh_a
        shift = 4 if params["use_shift"] and b % 2 == 1 else 0
        h = h + g_a * ssa(p, f"{n}.self_attn", x, coords, heads, params["num_kv_heads"], params["compression_block_size"],
                          params["selection_block_size"], params["topk"], params["compression_version"], shift)
        x = F.layer_norm(h, (c,), p[f"{n}.norm2.weight"], p[f"{n}.norm2.bias"], eps=1e-6)
        q = lin(x, p, f"{n}.cross_attn.to_q").view(len(x), heads, -1)
        kv = lin(cond, p, f"{n}.cross_attn.to_kv").view(len(cond), 2, heads, -1)
        s = torch.einsum("nhd,lhd->hnl", q, kv[:, 0]) / math.sqrt(c // heads)
        h = h + lin(torch.einsum("hnl,lhd->nhd", s.softmax(-1), kv[:, 1]).reshape(len(x), c), p, f"{n}.cross_attn.to_out")
        x = F.layer_norm(h, (c,), eps=1e-6) * (1 + sc_m) + sh_m
        h = h + g_m * lin(F.gelu(lin(x, p, f"{n}.mlp.mlp.0"), approximate="tanh"), p, f"{n}.mlp.mlp.2")
    return lin(F.layer_norm(h, (c,), eps=1e-5), p, "out_layer")


# ------------------------------------------------------------------------------------------------- dense models
def channel_ln(x, p, name, eps=1e-6):
    return F.layer_norm(x.movedim(1, -1), x.shape[1:2], p[f"{name}.weight"], p[f"{name}.bias"], eps).movedim(-1, 1)


def dense_res(x, p, name):
    h = conv3d(F.silu(channel_ln(x, p, f"{name}.norm1")), p, f"{name}.conv1")
    return x + conv3d(F.silu(channel_ln(h, p, f"{name}.norm2")), p, f"{name}.conv2")


def dense_vae_decode(p, z, params):
    """Latent [B, 8, r³] -> occupancy logits [B, 1, (4r)³] (TRELLIS decoder, pixel shuffle x2 upsampling)."""
    h = conv3d(z, p, "decoder.input_layer")
    for j in range(params["num_res_blocks_middle_decoder"]):
        h = dense_res(h, p, f"decoder.middle_block.{j}")
    i = 0
    for s, c in enumerate(params["model_channels_decoder"]):
        for _ in range(params["num_res_blocks_decoder"]):
            h = dense_res(h, p, f"decoder.blocks.{i}")
            i += 1
        if s + 1 < len(params["model_channels_decoder"]):
            h = conv3d(h, p, f"decoder.blocks.{i}.conv")
            b, cc, d, hh, w = h.shape
            h = h.view(b, cc // 8, 2, 2, 2, d, hh, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cc // 8, 2 * d, 2 * hh, 2 * w)
            i += 1
    return conv3d(F.silu(channel_ln(h, p, "decoder.out_layer.0")), p, "decoder.out_layer.2")


def dense_dit(p, params, x, t, cond):
    """x [1, 8, r³] -> velocity, cond [L, Cc] (full self-attention with q/k RMS norm, §3.2)."""
    c, heads, r = params["model_channels"], params["num_heads"], params["resolution"]
    d = c // heads
    h = lin(x.flatten(2).transpose(1, 2)[0], p, "input_layer") + p["pos_emb"]
    t_emb = timestep_embedding(t, p)
    for b in range(params["num_blocks"]):
        n = f"blocks.{b}"
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = lin(F.silu(t_emb), p, f"{n}.adaLN_modulation.1").chunk(6, 1)
        y = F.layer_norm(h, (c,), eps=1e-6) * (1 + sc_a) + sh_a
        q, k, v = lin(y, p, f"{n}.self_attn.to_qkv").view(len(y), 3, heads, d).unbind(1)
        q = F.normalize(q, dim=-1) * p[f"{n}.self_attn.q_rms_norm.gamma"] * math.sqrt(d)
        k = F.normalize(k, dim=-1) * p[f"{n}.self_attn.k_rms_norm.gamma"] * math.sqrt(d)
        s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)
        h = h + g_a * lin(torch.einsum("hnm,mhd->nhd", s.softmax(-1), v).reshape(len(y), c), p, f"{n}.self_attn.to_out")
        y = F.layer_norm(h, (c,), p[f"{n}.norm2.weight"], p[f"{n}.norm2.bias"], eps=1e-6)
        q = lin(y, p, f"{n}.cross_attn.to_q").view(len(y), heads, d)
        kv = lin(cond, p, f"{n}.cross_attn.to_kv").view(len(cond), 2, heads, d)
        s = torch.einsum("nhd,lhd->hnl", q, kv[:, 0]) / math.sqrt(d)
        h = h + lin(torch.einsum("hnl,lhd->nhd", s.softmax(-1), kv[:, 1]).reshape(len(y), c), p, f"{n}.cross_attn.to_out")
        y = F.layer_norm(h, (c,), eps=1e-6) * (1 + sc_m) + sh_m
        h = h + g_m * lin(F.gelu(lin(y, p, f"{n}.mlp.mlp.0"), approximate="tanh"), p, f"{n}.mlp.mlp.2")
    out = lin(F.layer_norm(h, (c,), eps=1e-5), p, "out_layer")
    return out.t().reshape(1, -1, r, r, r)
