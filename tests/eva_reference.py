"""Plain float64 references of the EVA blocks (timm parameter names) for the alignment-encoder tests: written
from the formulas, reading only a state dict, so that they check the modules independently."""
import math

import torch


def f64(sd: dict) -> dict:
    return {k: v.detach().double() for k, v in sd.items()}


def layer_norm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(x, p, pre, heads, fused):
    """x [B, N, D] float64; p: float64 state dict; pre: e.g. 'blocks.0.attn.'."""
    d = x.shape[-1]
    if fused:
        w = p[pre + "qkv.weight"]
        if pre + "qkv.bias" in p:  # timm ViT: one bias for q, k and v
            q, k, v = (x @ w.T + p[pre + "qkv.bias"]).split(d, -1)
        else:  # timm EVA: q and v biases, none for k
            q = x @ w[:d].T + p[pre + "q_bias"]
            k = x @ w[d:2 * d].T
            v = x @ w[2 * d:].T + p[pre + "v_bias"]
    else:
        q = x @ p[pre + "q_proj.weight"].T + p[pre + "q_proj.bias"]
        k = x @ p[pre + "k_proj.weight"].T
        v = x @ p[pre + "v_proj.weight"].T + p[pre + "v_proj.bias"]
    b, n, _ = x.shape
    hd = d // heads
    out = torch.zeros_like(x)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        out[..., sl] = torch.softmax(logits, -1) @ v[..., sl]
    return out @ p[pre + "proj.weight"].T + p[pre + "proj.bias"]


def mlp(x, p, pre, swiglu):
    if swiglu:
        g = x @ p[pre + "fc1_g.weight"].T + p[pre + "fc1_g.bias"]
        u = x @ p[pre + "fc1_x.weight"].T + p[pre + "fc1_x.bias"]
        h = layer_norm(g * torch.sigmoid(g) * u, p[pre + "norm.weight"], p[pre + "norm.bias"])
    else:
        h = gelu(x @ p[pre + "fc1.weight"].T + p[pre + "fc1.bias"])
    return h @ p[pre + "fc2.weight"].T + p[pre + "fc2.bias"]


def block(x, p, pre, heads, fused, swiglu, post_norm):
    def ln(name, y):
        return layer_norm(y, p[pre + name + ".weight"], p[pre + name + ".bias"])

    if post_norm:
        x = x + ln("norm1", attention(x, p, pre + "attn.", heads, fused))
        return x + ln("norm2", mlp(x, p, pre + "mlp.", swiglu))
    x = x + attention(ln("norm1", x), p, pre + "attn.", heads, fused)
    return x + mlp(ln("norm2", x), p, pre + "mlp.", swiglu)


def randomise_(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """Every floating parameter and buffer to random values (norm weights around 1, BN variances positive)."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=gen, dtype=t.dtype)
            if name.endswith("running_var"):
                t.copy_(0.5 + r.abs())
            elif name.endswith("weight") and t.dim() == 1:
                t.copy_(1 + 0.2 * r)
            else:
                t.copy_(scale * r * (3 / math.sqrt(t[0].numel()) if t.dim() > 1 else 1))
