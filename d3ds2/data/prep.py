"""The parallel, resumable data-prep driver: mesh files -> samples/KEY.tar -> packed webdataset shards.

Output layout under ``output``:
  samples/KEY.tar            one finished sample (written atomically; the durable unit of resumption)
  manifest/rank{r:03d}.jsonl one line per input: ok / skipped + reason, timings, voxel counts
  shards/rank{r:03d}-{i:05d}.tar   the packed webdataset shards of this rank (rewritten at the end)
KEY is :func:`d3ds2.data.mesh_sample.sample_key` of the input.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from ..geometry.mesh_io import is_supported
from .mesh_sample import SkipMesh, build_sample, sample_key
from .shard_format import encode_sample
from .shards import Manifest, read_tar, write_tar_atomic


class OutputError(RuntimeError):
    """The output folder cannot be written (disk full, permissions): the run stops."""


def list_inputs(spec: str) -> list[str]:
    """A folder (searched recursively for supported suffixes), a mesh file, or a .txt list of paths."""
    if os.path.isdir(spec):
        files = [p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True) if is_supported(p)]
    elif spec.endswith(".txt"):
        with open(spec) as f:
            files = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise FileNotFoundError(f"input={spec!r}: not a folder, a mesh file or a .txt list of paths")
    return sorted(os.path.abspath(p) for p in files)


def process_one(path: str, cfg, samples_dir: str) -> dict:
    """Run one input and write samples/KEY.tar; returns its manifest record (never raises for bad input)."""
    key = sample_key(path)
    t = time.perf_counter()
    try:
        sample, stats = build_sample(path, cfg)
    except SkipMesh as e:
        return {"key": key, "source": path, "status": "skipped", "reason": str(e),
                "seconds": round(time.perf_counter() - t, 3)}
    except Exception as e:  # an unexpected failure on one mesh must not stop the run
        return {"key": key, "source": path, "status": "skipped", "reason": f"{type(e).__name__}: {e}",
                "seconds": round(time.perf_counter() - t, 3)}
    try:
        write_tar_atomic(os.path.join(samples_dir, f"{key}.tar"), [encode_sample(sample)])
    except OSError as e:
        return {"key": key, "source": path, "status": "fatal",
                "reason": f"cannot write {samples_dir}: {e}; free space or choose another output folder"}
    return {"key": key, "source": path, "status": "ok", "seconds": round(time.perf_counter() - t, 3),
            "voxels": stats["voxels"], "timings": stats["timings"], "watertight": stats["watertight"]}


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_probe{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"output={folder!r} is not writable ({e}); choose another folder or free space") from None


def pack_shards(samples_dir: str, shards_dir: str, keys: list[str], rank: int, per_shard: int) -> list[str]:
    """Pack finished samples (sorted keys) into shards rank{rank}-{i}.tar; remove stale shards of this rank."""
    os.makedirs(shards_dir, exist_ok=True)
    paths = []
    for i in range(0, len(keys), per_shard):
        path = os.path.join(shards_dir, f"rank{rank:03d}-{i // per_shard:05d}.tar")
        samples = [s for k in keys[i : i + per_shard] for s in read_tar(os.path.join(samples_dir, f"{k}.tar"))]
        write_tar_atomic(path, samples)
        paths.append(path)
    for old in glob.glob(os.path.join(shards_dir, f"rank{rank:03d}-*.tar")):
        if old not in paths:
            os.remove(old)
    return paths


def run(cfg, progress: bool = True) -> dict:
    """Process this rank's part of the inputs in `cfg.workers` processes, resumably; returns the summary."""
    from tqdm import tqdm

    inputs = list_inputs(str(cfg.input))
    mine = inputs[cfg.rank :: cfg.world_size]
    out = str(cfg.output)
    samples_dir = os.path.join(out, "samples")
    check_writable(samples_dir)
    manifest = Manifest(os.path.join(out, "manifest", f"rank{cfg.rank:03d}.jsonl"))
    done = {}
    for r in manifest.records():
        ok = r["status"] == "ok" and os.path.exists(os.path.join(samples_dir, f"{r['key']}.tar"))
        if ok or r["status"] == "skipped":
            done[r["key"]] = r
    todo = [p for p in mine if sample_key(p) not in done]
    t0 = time.perf_counter()
    records = []
    bar = tqdm(total=len(todo), desc=f"data_prep rank {cfg.rank}", unit="mesh", disable=not progress)
    # CUDA cannot be used in forked children: start fresh workers when the distance queries run on torch
    context = multiprocessing.get_context("spawn" if cfg.sdf.backend == "torch" else None)
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=context) as pool:
        futures = [pool.submit(process_one, p, cfg, samples_dir) for p in todo]
        for fut in as_completed(futures):
            rec = fut.result()
            if rec["status"] == "fatal":
                for f in futures:
                    f.cancel()
                raise OutputError(rec["reason"])
            manifest.append(rec)
            records.append(rec)
            bar.update(1)
            bar.set_postfix(ok=sum(r["status"] == "ok" for r in records), skipped=sum(r["status"] != "ok" for r in records))
    bar.close()
    keys_ok = sorted({r["key"] for r in list(done.values()) + records if r["status"] == "ok"}
                     & {sample_key(p) for p in mine})
    try:
        shards = pack_shards(samples_dir, os.path.join(out, "shards"), keys_ok, cfg.rank, cfg.samples_per_shard)
    except OSError as e:
        raise OutputError(f"cannot write shards under {out!r}: {e}; free space or choose another output "
                          "folder") from None
    skipped = [r for r in records if r["status"] != "ok"]
    return {"inputs": len(mine), "already_done": len(mine) - len(todo), "processed": len(records),
            "ok": len(keys_ok), "skipped_now": len(skipped), "reasons": {r["source"]: r["reason"] for r in skipped},
            "shards": len(shards), "seconds": round(time.perf_counter() - t0, 2)}
