"""Submanifold conv 3³ on the GPU: Triton implicit GEMM vs the torch gather-GEMM-scatter path vs dense cuDNN.

Voxels: sphere shells 2 voxels thick at radius 0.4·res (the set of docs/benchmarks.md and
/work/shared/anchors.md), bf16, Cin = Cout = C, no bias. For each case: correctness first (outputs and
both gradients of both native paths against the float32 gather-GEMM-scatter reference), then medians after
warm-up (benchmarks/harness.py), all paths timed in the same run. "cold" = building the neighbour table / kernel map from the coords plus the
call, as spconv's anchor figures rebuild theirs. Peak = max allocated GiB during one cold fwd+bwd, inputs
included.

    python benchmarks/sparse_conv.py --out OUT_DIR [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from harness import median_ms, peak_gib, write_outputs

from d3ds2.sparse.coords import pack_keys
from d3ds2.sparse.gemm import sparse_conv
from d3ds2.sparse.kernel_map import submanifold_map, submanifold_table
from d3ds2.kernels.sparse_conv import submconv

# spconv 2.3.8, fp16, H200, map rebuilt per call (anchors.md): (res, C) -> (fwd ms, fwd+bwd ms)
SPCONV = {
    (256, 32): (0.436, 1.34), (256, 64): (0.512, 1.61), (256, 128): (0.882, 2.73), (256, 512): (9.88, 33.8),
    (512, 32): (1.24, 3.86), (512, 64): (1.44, 4.43), (512, 128): (2.92, 10.3),
    (1024, 32): (5.82, 17.5), (1024, 64): (6.62, 19.6), (1024, 128): (12.9, 46.3),
}
CASES = {256: (32, 64, 128, 512), 512: (32, 64, 128), 1024: (32, 64, 128)}


def shell_coords(res: int, device: str = "cuda", chunk: int = 32) -> torch.Tensor:
    """[N, 4] int32 sorted coords of the shell |r - 0.4·res| < 1 (voxel centres at i + 0.5 - res/2)."""
    g = torch.arange(res, device=device, dtype=torch.float32) + 0.5 - res / 2
    y, z = torch.meshgrid(g, g, indexing="ij")
    yz = y * y + z * z
    parts = []
    for x0 in range(0, res, chunk):
        xs = g[x0 : x0 + chunk]
        r = (xs[:, None, None] ** 2 + yz).sqrt()
        idx = torch.nonzero((r - 0.4 * res).abs() < 1.0)
        idx[:, 0] += x0
        parts.append(idx)
    xyz = torch.cat(parts).int()
    return torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)


def bench(fn, grads=()) -> float:
    return median_ms(fn, warmup=25, iters=100, grad_to_none=grads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def fwd_bwd(conv, f, w, index, go):
    def run():
        conv(f, w, index).backward(go)
    return run


def run_case(res: int, coords: torch.Tensor, c: int, rows: list, log) -> None:
    n = coords.shape[0]
    gen = torch.Generator(device="cuda").manual_seed(res * 1000 + c)
    keys = pack_keys(coords)
    nbr = submanifold_table(coords, keys, 3)
    kmap = submanifold_map(coords, keys, 3)
    assert torch.equal(nbr, kmap.neighbor_table()), "table and kernel map disagree"
    f32 = torch.randn(n, c, device="cuda", generator=gen)
    w32 = torch.randn(27, c, c, device="cuda", generator=gen) / (27 * c) ** 0.5
    go32 = torch.randn(n, c, device="cuda", generator=gen)

    # correctness: bf16 Triton and bf16 torch vs the float32 gather-GEMM-scatter path
    def grads(conv, f, w, index, go):
        f = f.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        y = conv(f, w, index)
        return (y, *torch.autograd.grad(y, [f, w], go))

    ref = grads(sparse_conv, f32, w32, kmap, go32)
    bf = lambda t: t.bfloat16()  # noqa: E731
    err_tri = [rel(a, b) for a, b in zip(grads(submconv, bf(f32), bf(w32), nbr, bf(go32)), ref)]
    err_torch = [rel(a, b) for a, b in zip(grads(sparse_conv, bf(f32), bf(w32), kmap, bf(go32)), ref)]
    del ref
    ok = max(err_tri) < 2e-2
    log(f"res {res} N {n} C {c}: rel err triton (out, dfeats, dW) {err_tri}, torch {err_torch}, ok={ok}")

    f = bf(f32).requires_grad_(True)
    w = bf(w32).requires_grad_(True)
    go = bf(go32)
    del f32, w32, go32
    out = {"res": res, "voxels": n, "C": c, "err_triton": err_tri, "err_torch": err_torch, "ok": ok}
    with torch.no_grad():
        out["triton_fwd"] = bench(lambda: submconv(f, w, nbr))
        out["torch_fwd"] = bench(lambda: sparse_conv(f, w, kmap))
        out["triton_cold_fwd"] = bench(lambda: submconv(f, w, submanifold_table(coords, pack_keys(coords), 3)))
    out["triton_fb"] = bench(fwd_bwd(submconv, f, w, nbr, go), [f, w])
    out["torch_fb"] = bench(fwd_bwd(sparse_conv, f, w, kmap, go), [f, w])

    def cold(conv, build):
        def run():
            conv(f, w, build(coords, pack_keys(coords), 3)).backward(go)
        return run

    out["triton_cold_fb"] = bench(cold(submconv, submanifold_table), [f, w])
    out["triton_peak"] = peak_gib(cold(submconv, submanifold_table))
    out["torch_peak"] = peak_gib(cold(sparse_conv, submanifold_map))
    if res == 256 and c <= 64:  # dense cuDNN conv3d on the bounding grid (conv only, no scatter/gather)
        x = torch.randn(1, c, res, res, res, device="cuda", dtype=torch.bfloat16, generator=gen)
        x = x.to(memory_format=torch.channels_last_3d).requires_grad_(True)
        wd = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=torch.bfloat16, generator=gen)
        wd = wd.to(memory_format=torch.channels_last_3d).requires_grad_(True)
        gd = torch.randn(1, c, res, res, res, device="cuda", dtype=torch.bfloat16, generator=gen)
        gd = gd.to(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            out["dense_fwd"] = bench(lambda: F.conv3d(x, wd, padding=1))
        out["dense_fb"] = bench(lambda: F.conv3d(x, wd, padding=1).backward(gd), [x, wd])
        del x, wd, gd
    rows.append(out)
    log(json.dumps(out))


def table_build_times(res: int, coords: torch.Tensor) -> dict:
    return {
        "res": res,
        "voxels": coords.shape[0],
        "table_ms": bench(lambda: submanifold_table(coords, pack_keys(coords), 3)),
        "kmap_ms": bench(lambda: submanifold_map(coords, pack_keys(coords), 3)),
    }


def fmt(rows: list, maps: list) -> str:
    def r(x):
        return f"{x:.3g}" if x >= 0.1 else f"{x:.2g}"

    lines = [
        "| res | voxels | C | Triton fwd ms | Triton fwd+bwd ms | Triton cold fwd / fwd+bwd ms | torch fwd / fwd+bwd ms "
        "| spconv (anchors, H200) cold fwd / fwd+bwd ms | Triton cold ÷ spconv fwd / fwd+bwd "
        "| torch ÷ Triton fwd / fwd+bwd | Triton fwd TFLOP/s | dense cuDNN fwd / fwd+bwd ms | peak GiB Triton / torch | max rel err bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in rows:
        sp = SPCONV.get((o["res"], o["C"]))
        ratio_sp = f"{o['triton_cold_fwd'] / sp[0]:.2f}x / {o['triton_cold_fb'] / sp[1]:.2f}x" if sp else "-"
        spc = f"{sp[0]} / {sp[1]}" if sp else "-"
        dense = f"{r(o['dense_fwd'])} / {r(o['dense_fb'])}" if "dense_fwd" in o else "-"
        tflops = 2 * o["voxels"] * 27 * o["C"] ** 2 / (o["triton_fwd"] * 1e-3) / 1e12
        lines.append(
            f"| {o['res']} | {o['voxels']:,} | {o['C']} | {r(o['triton_fwd'])} | {r(o['triton_fb'])} "
            f"| {r(o['triton_cold_fwd'])} / {r(o['triton_cold_fb'])} | {r(o['torch_fwd'])} / {r(o['torch_fb'])} "
            f"| {spc} | {ratio_sp} "
            f"| {o['torch_fwd'] / o['triton_fwd']:.1f}x / {o['torch_fb'] / o['triton_fb']:.1f}x | {tflops:.0f} | {dense} "
            f"| {o['triton_peak']:.2f} / {o['torch_peak']:.2f} | {max(o['err_triton']):.1e} |"
        )
    lines += ["", "Map construction (included in the cold columns):", "",
              "| res | voxels | neighbour table (Triton path) ms | kernel map (torch path) ms |", "|---|---|---|---|"]
    for m in maps:
        lines.append(f"| {m['res']} | {m['voxels']:,} | {r(m['table_ms'])} | {r(m['kmap_ms'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for sparse_conv.md / .json / .log")
    p.add_argument("--quick", action="store_true", help="256³ only (smoke test)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "sparse_conv.log"), "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    def save() -> str:
        return write_outputs(args.out, "sparse_conv", fmt(rows, maps), {"rows": rows, "maps": maps})

    rows, maps = [], []
    t0 = time.time()
    for res, channels in CASES.items():
        if args.quick and res > 256:
            break
        coords = shell_coords(res)
        maps.append(table_build_times(res, coords))
        log(json.dumps(maps[-1]))
        for c in channels:
            run_case(res, coords, c, rows, log)
            log(f"elapsed {time.time() - t0:.0f} s")
            save()  # partial results survive a time-out
            torch.cuda.empty_cache()
    print(save())


if __name__ == "__main__":
    main()
