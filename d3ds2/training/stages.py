"""Chained training stages: which run a stage starts from, and whether the data holds its resolutions.

A stage builds on earlier ones (``dit_384`` starts from ``dit_256``'s EMA weights, ``index_dit`` needs the
``index_vae`` it was trained with). Runs live in ``<log_dir>/<task>/<run_name>/``; a run is *finished* when
``train.py`` wrote ``finished.json`` next to ``checkpoints/last.ckpt`` at the end of its schedule (a run that
crashed, was killed or was paused by ``pause_after`` has no marker). Specs of a checkpoint to start from:

- ``null`` / ``latest``: the latest finished run of the task the experiment names (``chain.init``, ``chain.vae``);
- ``RUN_DIR``: that run's ``checkpoints/last.ckpt``; ``CKPT``: that file;
- ``PREFIX:REST``: a resolver registered with :func:`register_checkpoint_resolver` (``official:DIR``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ..data.layout import is_remote, shard_urls

log = logging.getLogger(__name__)

FINISHED_MARKER = "finished.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"

_RESOLVERS: dict[str, Callable[[str], str]] = {}


class StageError(FileNotFoundError):
    """A stage cannot find what it builds on (no finished run, a missing checkpoint, unprepared data)."""


def register_checkpoint_resolver(prefix: str, resolver: Callable[[str], str]) -> None:
    """``PREFIX:REST`` specs go to ``resolver(REST)``, which returns a checkpoint path (or raises)."""
    _RESOLVERS[prefix] = resolver


def _official_release(rest: str) -> str:
    """``official:DIR[#section]`` is kept as it is: :func:`d3ds2.checkpoint.load_net_weights` reads released
    Direct3D-S2 weights from it; the folder is checked here, before anything is built."""
    folder = rest.split("#", 1)[0]
    if not Path(folder).is_dir():
        raise StageError(f"official:{rest}: {folder} is not a folder; pass the folder of a Direct3D-S2 release "
                         "snapshot (config.yaml and the model_*.ckpt files)")
    return f"official:{rest}"


register_checkpoint_resolver("official", _official_release)


# ------------------------------------------------------------------------------------------------
# finished marker
def write_finished_marker(run_dir: str | os.PathLike, **info) -> Path:
    """Write ``<run_dir>/finished.json`` (atomically) with ``info`` and the finish time."""
    path = Path(run_dir) / FINISHED_MARKER
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**info, "finished_at": time.time()}, indent=2))
    tmp.replace(path)
    return path


def clear_finished_marker(run_dir: str | os.PathLike) -> None:
    """A run that trains again is unfinished until it ends again."""
    (Path(run_dir) / FINISHED_MARKER).unlink(missing_ok=True)


def read_finished_marker(run_dir: str | os.PathLike) -> dict | None:
    """The marker of a finished run (with its ``last.ckpt`` present), else None."""
    run_dir = Path(run_dir)
    marker = run_dir / FINISHED_MARKER
    if not marker.is_file() or not (run_dir / LAST_CHECKPOINT).is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------
# finding runs
def finished_runs(log_dir: str | os.PathLike, task: str) -> list[Path]:
    """Finished runs of ``task`` under ``log_dir``, oldest finish first."""
    root = Path(log_dir) / task
    runs = []
    for d in root.iterdir() if root.is_dir() else []:
        info = read_finished_marker(d) if d.is_dir() else None
        if info is not None:
            runs.append((float(info.get("finished_at", 0.0)), d.name, d))
    return [d for _, _, d in sorted(runs)]


def latest_finished_run(log_dir: str | os.PathLike, task: str, needed_by: str = "this stage") -> Path:
    """The finished run of ``task`` that finished last; a StageError that says what to run when none."""
    runs = finished_runs(log_dir, task)
    if runs:
        return runs[-1]
    started = sorted(p.name for p in (Path(log_dir) / task).glob("*") if (p / LAST_CHECKPOINT).is_file())
    hint = (f" (runs with a checkpoint but no {FINISHED_MARKER}: {', '.join(started)}: resume one with "
            f"`python train.py experiment={task} run_name=NAME ckpt_path=last`, or pass its directory)"
            if started else "")
    raise StageError(
        f"{needed_by} builds on a finished `{task}` run, and {Path(log_dir) / task} holds none{hint}. Train it "
        f"first (`python train.py experiment={task}`), or name the run or checkpoint to use (RUN_DIR or CKPT)."
    )


def resolve_checkpoint(spec: str | None, log_dir: str | os.PathLike, task: str | None = None,
                       needed_by: str = "this stage") -> str:
    """A checkpoint path from ``spec`` (see the module docstring); ``task`` answers ``null`` / ``latest``."""
    if spec in (None, "", "latest"):
        if not task:
            raise StageError(f"{needed_by}: no checkpoint given and no earlier stage named to find one in")
        return str(latest_finished_run(log_dir, task, needed_by) / LAST_CHECKPOINT)
    spec = str(spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in _RESOLVERS:
        return _RESOLVERS[prefix](rest)
    if sep and len(prefix) > 1 and not Path(spec).exists():  # 'C:\...' or an existing path are paths
        raise StageError(f"{needed_by}: unknown checkpoint source {prefix!r} in {spec!r}; known: "
                         f"{sorted(_RESOLVERS) or 'none registered'} (or give RUN_DIR / CKPT)")
    path = Path(spec)
    if path.is_dir():
        ckpt = path / LAST_CHECKPOINT
        if not ckpt.is_file():
            raise StageError(f"{needed_by}: run directory {path} has no {LAST_CHECKPOINT}")
        if read_finished_marker(path) is None:
            log.warning("%s: run %s has not finished (no %s); using its last.ckpt", needed_by, path, FINISHED_MARKER)
        return str(ckpt)
    if path.is_file():
        return str(path)
    raise StageError(f"{needed_by}: {spec} is neither a run directory nor a checkpoint file")


# ------------------------------------------------------------------------------------------------
# data resolutions
def prepared_resolutions(shards: list[str]) -> list[int] | None:
    """SDF resolutions stored in the first sample of the first data-prep shard (every sample holds the same);
    None when that shard is not a local file (a URL is checked by the reader, not here)."""
    import tarfile

    if not shards or not os.path.isfile(shards[0]):
        return None
    from ..data.shard_format import sdf_key

    with tarfile.open(shards[0]) as tar:
        first = None
        found = set()
        for member in tar:
            key, _, name = member.name.partition(".")
            if first is None:
                first = key
            if key != first:
                break
            if name.startswith("sdf") and name.endswith(".npz"):
                found.add(name)
    return sorted(int(n[3:-4]) for n in found if n == sdf_key(int(n[3:-4])))


def check_resolutions(needed: list[int], shards: list[str], stage: str = "this stage") -> list[int]:
    """Raise StageError when a resolution in ``needed`` is above every prepared one (it would be upsampled).

    A resolution between prepared ones is resampled from the next higher one, as the paper's multi-resolution
    training does; one above the highest has no detail to resample from.
    """
    prepared = prepared_resolutions(shards)
    if prepared is None:
        return []
    missing = sorted(r for r in set(needed) if not prepared or r > max(prepared))
    if missing:
        want = sorted(set(prepared) | set(missing))
        raise StageError(
            f"{stage} trains at {missing} but the data in {Path(shards[0]).parent} was prepared at {prepared} "
            "(higher resolutions would be upsampled from lower ones): prepare it into a new folder with "
            f"`python -m data_prep input=MESHES output=NEW_DIR resolutions=[{','.join(map(str, want))}]`"
        )
    return prepared


# ------------------------------------------------------------------------------------------------
# a training config's chain
def _resume_checkpoint_exists(cfg) -> bool:
    spec = cfg.get("ckpt_path")
    if spec == "last":
        return (Path(cfg.paths.output_dir) / LAST_CHECKPOINT).is_file()
    return spec not in (None, "", "null")


def apply_chain(cfg) -> dict[str, str]:
    """Fill ``model.init_from`` and ``model.vae_ckpt`` of a train.py config from the stages it builds on.

    ``init_from`` (top level; a resumed run skips it: its checkpoint holds the weights), else an explicit
    ``model.init_from``, else the latest finished run of ``chain.init``; likewise ``vae_from``, else
    ``model.vae_ckpt``, else the latest finished run of ``chain.vae``. ``none`` switches one off. Also checks the VAE data's resolutions (:func:`check_resolutions`). Returns what was
    filled, {config key: checkpoint}, and records it in ``cfg.chain.resolved``.
    """
    from omegaconf import open_dict

    chain = cfg.get("chain") or {}
    log_dir, stage = cfg.paths.log_dir, f"experiment {cfg.get('task_name')}"
    filled: dict[str, str] = {}
    for key, spec, task, skip in (("init_from", cfg.get("init_from"), chain.get("init"), _resume_checkpoint_exists(cfg)),
                                  ("vae_ckpt", cfg.get("vae_from"), chain.get("vae"), False)):
        if spec is None and not task or skip:
            continue
        if spec is None and cfg.model.get(key):  # model.init_from / model.vae_ckpt given explicitly: kept
            continue
        with open_dict(cfg):
            if isinstance(spec, str) and spec.lower() == "none":
                cfg.model[key] = None
                continue
            cfg.model[key] = filled[f"model.{key}"] = resolve_checkpoint(spec, log_dir, task, stage)
    data = cfg.get("data") or {}
    shards = data.get("train_shards")
    if "resolutions" in data and isinstance(shards, str):
        needed = [*data.resolutions, *([data.val_resolution] if data.get("val_resolution") else [])]
        try:
            local = [u for u in shard_urls(shards, "train") if not is_remote(u)]
        except FileNotFoundError:
            local = []  # no data yet: the data module names what is missing when it starts
        check_resolutions(needed, local, stage)
    if filled:
        with open_dict(cfg):
            cfg.chain = {**chain, "resolved": filled}
        for k, v in filled.items():
            log.info("%s <- %s", k, v)
    return filled
