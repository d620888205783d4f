"""The parallel, resumable data-prep driver: mesh files -> samples/KEY.tar -> packed webdataset shards.

Output under ``output`` (names from :mod:`d3ds2.data.layout`):
  samples/KEY.tar            one finished sample (written atomically; the durable unit of resumption)
  manifest/rank{r:03d}.jsonl one line per input: ok / skipped (bad input) / failed (a worker killed by a
                             signal, or a transient error: memory, permissions) + reason, timings, voxel
                             counts; the last line of a key wins
  shards/{split}-rank{r:03d}-{i:05d}.tar   the packed webdataset shards of this rank per split (rewritten at the end)
KEY is :func:`d3ds2.data.mesh_sample.sample_key` of the input; the split comes from :mod:`d3ds2.data.splits`.
"""
from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter

from ..geometry.mesh_io import is_supported, is_transient_error
from .layout import SPLITS, DataLayout
from .mesh_sample import SkipMesh, build_sample, sample_key
from .shard_format import encode_sample
from .shards import Manifest, read_tar, write_tar_atomic
from .splits import assign_split, read_split_file
from .worker_pool import imap_surviving

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The output folder cannot be written (disk full, permissions): the run stops."""


def list_inputs(spec: str) -> tuple[list[str], dict[str, int]]:
    """(input paths, count of the files of a folder left out by suffix): a folder (searched recursively for
    supported suffixes), a mesh file, or a .txt list of paths."""
    unsupported: Counter = Counter()
    if os.path.isdir(spec):
        files = []
        for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True):
            if is_supported(p):
                files.append(p)
            elif os.path.isfile(p):
                unsupported[os.path.splitext(p)[1].lower() or "(no suffix)"] += 1
    elif spec.endswith(".txt"):
        with open(spec) as f:
            files = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise FileNotFoundError(f"input={spec!r}: not a folder, a mesh file or a .txt list of paths")
    return sorted(os.path.abspath(p) for p in files), dict(sorted(unsupported.items()))


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
        transient = is_transient_error(e)
        return {"key": key, "source": path, "status": "failed" if transient else "skipped",
                "reason": f"{type(e).__name__}: {e}", "retryable": transient, "seconds": round(time.perf_counter() - t, 3)}
    try:
        write_tar_atomic(os.path.join(samples_dir, f"{key}.tar"), [encode_sample(sample)])
    except OSError as e:
        return {"key": key, "source": path, "status": "fatal",
                "reason": f"cannot write {samples_dir}: {e}; free space or choose another output folder"}
    return {"key": key, "source": path, "status": "ok", "seconds": round(time.perf_counter() - t, 3),
            "voxels": stats["voxels"], "timings": stats["timings"], "watertight": stats["watertight"]}


def crash_record(path: str, exitcode: int | None) -> dict:
    """The manifest record of an input whose worker died while processing it."""
    if exitcode is not None and exitcode < 0:
        how = f"killed by signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exited with code {exitcode}"
    return {"key": sample_key(path), "source": path, "status": "failed", "retryable": True, "exitcode": exitcode,
            "signal": signal.Signals(-exitcode).name if exitcode is not None and exitcode < 0 else None,
            "reason": f"the worker process was {how} while processing this mesh (out of memory, a native crash "
                      "or a kill); it is not retried unless retry_failed=true"}


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_probe{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"output={folder!r} is not writable ({e}); choose another folder or free space") from None


def pack_shards(layout: DataLayout, keys: list[str], split: str, rank: int, per_shard: int) -> list[str]:
    """Pack finished samples (sorted keys) into shards {split}-rank{rank}-{i}.tar; remove stale ones of this rank."""
    os.makedirs(layout.shards_dir, exist_ok=True)
    paths = []
    for i in range(0, len(keys), per_shard):
        path = layout.shard(split, rank, i // per_shard)
        samples = [s for k in keys[i : i + per_shard] for s in read_tar(layout.sample(k))]
        write_tar_atomic(path, samples)
        paths.append(path)
    for old in glob.glob(os.path.join(layout.shards_dir, f"{split}-rank{rank:03d}-*.tar")):
        if old not in paths:
            os.remove(old)
    return paths


def split_of_inputs(cfg, paths: list[str]) -> dict[str, str]:
    """{sample key: 'train' | 'val'} of the inputs (cfg.val_fraction, cfg.split_file; see d3ds2.data.splits)."""
    spec = str(cfg.input)
    root = spec if os.path.isdir(spec) else None
    pinned = read_split_file(str(cfg.split_file)) if cfg.get("split_file") else {}
    return {sample_key(p): assign_split(p, sample_key(p), root, float(cfg.val_fraction), pinned) for p in paths}


def run(cfg, progress: bool = True) -> dict:
    """Process this rank's part of the inputs in `cfg.workers` processes, resumably; returns the summary."""
    from tqdm import tqdm

    inputs, unsupported = list_inputs(str(cfg.input))
    if unsupported:
        log.warning("input=%s: %d files of unsupported suffixes left out: %s", cfg.input, sum(unsupported.values()), unsupported)
    mine = inputs[cfg.rank :: cfg.world_size]
    out = str(cfg.output)
    layout = DataLayout(out)
    samples_dir = layout.samples_dir
    split = split_of_inputs(cfg, mine)
    check_writable(samples_dir)
    manifest = Manifest(layout.manifest(cfg.rank))
    last = {r["key"]: r for r in manifest.records()}  # the latest record of every input
    retry = cfg.get("retry_failed", False)
    done = {k: r for k, r in last.items()
            if (r["status"] == "ok" and os.path.exists(os.path.join(samples_dir, f"{k}.tar")))
            or r["status"] == "skipped" or (r["status"] == "failed" and not retry)}
    todo = [p for p in mine if sample_key(p) not in done]
    t0 = time.perf_counter()
    records = []
    bar = tqdm(total=len(todo), desc=f"data_prep rank {cfg.rank}", unit="mesh", disable=not progress)
    # CUDA cannot be used in forked children: start fresh workers when the distance queries run on torch
    context = multiprocessing.get_context("spawn" if cfg.sdf.backend == "torch" else None)
    results = imap_surviving(process_one, todo, (cfg, samples_dir), cfg.workers, context)
    try:
        for path, rec, exitcode in results:
            if rec is None:
                rec = crash_record(path, exitcode)
                log.warning("%s: %s", path, rec["reason"])
            if rec["status"] == "fatal":
                raise OutputError(rec["reason"])
            manifest.append(rec)
            records.append(rec)
            bar.update(1)
            bar.set_postfix(ok=sum(r["status"] == "ok" for r in records), skipped=sum(r["status"] != "ok" for r in records))
    finally:
        results.close()  # stops the workers, killing busy ones when the run stops early
    bar.close()
    keys_ok = sorted({r["key"] for r in list(done.values()) + records if r["status"] == "ok"}
                     & {sample_key(p) for p in mine})
    try:
        shards = [p for name in SPLITS for p in pack_shards(layout, [k for k in keys_ok if split[k] == name], name,
                                                              cfg.rank, cfg.samples_per_shard)]
    except OSError as e:
        raise OutputError(f"cannot write shards under {out!r}: {e}; free space or choose another output "
                          "folder") from None
    skipped = [r for r in records if r["status"] != "ok"]
    failed = [r for r in records if r["status"] == "failed"]
    return {"inputs": len(mine), "already_done": len(mine) - len(todo), "processed": len(records),
            "ok": len(keys_ok), "skipped_now": len(skipped), "failed_now": len(failed),
            "crashed_now": sum("exitcode" in r for r in failed),
            "reasons": {r["source"]: r["reason"] for r in skipped}, "unsupported_files": unsupported,
            "splits": {name: sum(split[k] == name for k in keys_ok) for name in SPLITS},
            "shards": len(shards), "seconds": round(time.perf_counter() - t0, 2)}
