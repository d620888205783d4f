"""Training-step time, MFU and peak memory of the 509M SS-DiT (v1.1) at the paper's token counts (GPU).

For each attention mode (SSA when available, full attention = FlashAttention varlen) x gradient
checkpointing x tokens per sample (Table 1: 2,058 / 5,510 / 10,655 / 45,904) one AdamW step in bf16
autocast on a token-budget batch (B = max(1, 32768 // N) samples of N tokens; batch 1 at 45,904). Tokens
are the latent cells nearest a sphere of radius 0.4 x grid (grid = resolution / 8 of the stage). Condition: 1374 dense tokens.
MFU = counted model FLOPs (matmuls of every Linear + attention scores/values of the mode's algorithm,
x3 for forward + backward, recomputation not counted) / step time / 989 TFLOP/s (H100/H200 dense bf16).
Usage: python benchmarks/dit_step.py --out results.md
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from d3ds2.models.sparse_dit import SparseDiT
from d3ds2.sparse import SparseTensor

PEAK_BF16 = 989e12
TABLE1 = (2058, 5510, 10655, 45904)
LATENT_GRID = {2058: 32, 5510: 48, 10655: 64, 45904: 128}  # fine 256 / 384 / 512 / 1024 over 8
CTX = 1374


def shell_coords(n: int, grid: int, batch: int, device) -> torch.Tensor:
    """n latent cells per sample closest to the sphere of radius 0.4 grid (int32 (b, x, y, z), sorted)."""
    g = torch.stack(torch.meshgrid(*[torch.arange(grid, device=device)] * 3, indexing="ij"), -1).view(-1, 3)
    d = ((g.float() + 0.5 - grid / 2).norm(dim=1) - 0.4 * grid).abs()
    cells = g[torch.argsort(d)[:n]]
    cells = cells[torch.argsort((cells[:, 0] * grid + cells[:, 1]) * grid + cells[:, 2])]
    rows = [torch.cat([torch.full((n, 1), b, device=device), cells], 1) for b in range(batch)]
    return torch.cat(rows).int()


def model_flops(model: SparseDiT, x: SparseTensor, mode: str) -> float:
    """Forward FLOPs (2 per multiply-add) of one step on x (all samples)."""
    c, n, b = model.model_channels, x.num_voxels, x.batch_size
    per_token_linear = 0
    ctx_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if "cross_attn.to_kv" in name:
                ctx_linear += m.in_features * m.out_features
            elif "adaLN" in name or "t_embedder" in name:
                continue  # per sample, negligible
            else:
                per_token_linear += m.in_features * m.out_features
    flops = 2 * per_token_linear * n + 2 * ctx_linear * CTX * b
    blocks = len(model.blocks)
    counts = x.counts.double()
    cross = 4 * n * CTX * c
    if mode == "full":
        self_attn = float(4 * (counts**2).sum() * c)
    else:  # SSA: compressed (all compressed tokens), selected (top-k blocks of <= 512), window (8^3)
        try:  # needs the SSA module's layout (compressed tokens, selection blocks)
            cfg = model.blocks[0].self_attn.config
            layout = model.blocks[0].self_attn.layout_for(x)
            nc = float(layout.cmp_counts.numel()) / b
            blk = n / max(1, layout.block_offsets.numel() - 1)
            self_attn = 4 * n * c * (nc + cfg.topk * blk + blk)
        except AttributeError:
            return float("nan")
    return flops + blocks * (self_attn + cross)


def bench(mode: str, ckpt: bool, n: int, device, steps: int = 5) -> dict:
    torch.manual_seed(0)
    grid = LATENT_GRID.get(n, 128 if n > 20000 else 64)
    batch = 1 if n > 20000 else max(1, 32768 // n)
    model = SparseDiT(attention=mode, use_checkpoint=ckpt,
                      ssa={"m_cmp": 8, "m_slc": 8, "topk": 8, "compression": "v1"} if mode == "ssa" else None).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    coords = shell_coords(n, grid, batch, device)
    x = SparseTensor(torch.randn(len(coords), 16, device=device), coords, batch)
    cond = torch.randn(batch, CTX, 1024, device=device)
    t = torch.rand(batch, device=device) * 1000
    target = torch.randn_like(x.feats)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(steps + 2):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, t, cond).feats
            loss = (out.float() - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        times = []
    if not times:
        del model, opt
        torch.cuda.empty_cache()
        return {"mode": mode, "ckpt": ckpt, "tokens": n, "batch": batch, "oom": True}
    step = sorted(times)[len(times) // 2]
    flops = 3 * model_flops(model, x, mode)
    res = {"mode": mode, "ckpt": ckpt, "tokens": n, "batch": batch, "step_ms": step * 1e3,
           "tokens_per_s": batch * n / step, "tflops": flops / step / 1e12, "mfu": flops / step / PEAK_BF16,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "loss": float(loss)}
    del model, opt, x, out
    torch.cuda.empty_cache()
    return res


def check_correctness(device) -> str:
    """bf16 GPU forward of a small random-weight model vs float64 CPU; batch of two = each alone."""
    torch.manual_seed(0)
    model = SparseDiT(model_channels=128, cond_channels=64, num_blocks=2, num_heads=8, num_kv_heads=2, attention="full")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    coords = torch.cat([shell_coords(300, 16, 1, "cpu"), shell_coords(150, 12, 1, "cpu") + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])
    x = SparseTensor(torch.randn(450, 16), coords, 2)
    t, cond = torch.tensor([100.0, 700.0]), torch.randn(2, 20, 64)
    ref = model.double()(x.replace(x.feats.double()), t.double(), cond.double()).feats.float()
    model = model.float().to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.to(device), t.to(device), cond.to(device)).feats.float().cpu()
        xa = SparseTensor(x.feats[:300], coords[:300], 1).to(device)
        alone = model(xa, t[:1].to(device), cond[:1].to(device)).feats.float().cpu()
    err = ((out - ref).norm() / ref.norm()).item()
    err_b = ((out[:300] - alone).norm() / alone.norm()).item()
    assert err < 0.03 and err_b < 0.03, (err, err_b)
    return f"bf16 GPU vs float64 CPU relative error {err:.2e}; batch-of-two vs alone {err_b:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dit_step.json")
    ap.add_argument("--tokens", default=",".join(map(str, TABLE1)))
    args = ap.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), torch.__version__, flush=True)
    print(check_correctness(device), flush=True)
    try:
        from d3ds2.attention import SpatialSparseAttention  # noqa: F401  (present?)

        modes = ["ssa", "full"]
    except ImportError:
        modes = ["full"]
    results = []
    for n in map(int, args.tokens.split(",")):
        for mode in modes:
            for ckpt in (False, True):
                try:
                    r = bench(mode, ckpt, n, device)
                except Exception as e:  # keep the other configurations' numbers
                    r = {"mode": mode, "ckpt": ckpt, "tokens": n, "error": repr(e)[:300]}
                    torch.cuda.empty_cache()
                print(json.dumps(r), flush=True)
                results.append(r)
                with open(args.out, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
