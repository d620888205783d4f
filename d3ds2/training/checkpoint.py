"""Checkpoint files of training: atomic saves with the usual file mode, resume loads through the safe loader,
and the newest readable checkpoint when ``last.ckpt`` is damaged."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..checkpoint import CheckpointUnreadable, load_checkpoint

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``; the file gets
    mode 0666 minus the umask (0644 usually), as ``open`` would give it, not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def newest_readable_checkpoint(last: str | os.PathLike) -> Path | None:
    """``last`` if it loads, else the newest (by modification time) readable ``*.ckpt`` beside it, with a
    warning naming both; None when none is readable. A file whose contents the safe loader refuses is
    not skipped: its error is raised (a refused checkpoint is not damage to work around)."""
    last = Path(last)
    others = sorted((p for p in last.parent.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in [last, *others]:
        try:
            load_checkpoint(candidate, "resume", "a checkpoint written by train.py")
        except CheckpointUnreadable as e:
            log.warning("%s", e)
            continue
        if candidate != last:
            log.warning("%s is unreadable: resuming from %s, the newest readable checkpoint beside it", last, candidate)
        return candidate
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves never leave a truncated ``.ckpt`` behind (kill -9 safe) and whose
    resume loads (``ckpt_path``) go through :func:`d3ds2.checkpoint.load_checkpoint`: tensors and plain
    containers only (``weights_only``), on the CPU (Lightning moves the states onto the model's device)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, "resume (ckpt_path)", "a checkpoint written by train.py")
