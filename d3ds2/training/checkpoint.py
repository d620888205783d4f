"""Checkpoint IO: atomic writes, and loading a net's weights with a clear mismatch report."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose saves never leave a truncated ``.ckpt`` behind (kill -9 safe)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def net_state_from_checkpoint(ckpt: dict, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The ``net`` weights of a d3ds2 Lightning checkpoint (EMA shadow when present and preferred)."""
    state = {k[len("net.") :]: v for k, v in ckpt.get("state_dict", ckpt).items() if k.startswith("net.")}
    if not state:
        state = dict(ckpt.get("state_dict", ckpt))
    if prefer_ema and "ema" in ckpt:
        state.update({k: v.to(state[k].dtype) if k in state else v for k, v in ckpt["ema"].items()})
    return state


def load_net_weights(path: str | os.PathLike, net: nn.Module, prefer_ema: bool = True) -> nn.Module:
    """Load weights into ``net`` from a Lightning checkpoint or a plain state dict; report mismatches.

    Raises a ValueError that lists missing, unexpected and wrongly shaped keys when the checkpoint was
    made for another architecture or configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = net_state_from_checkpoint(ckpt, prefer_ema)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")

        raise ValueError(
            f"checkpoint {path} does not match {type(net).__name__}: "
            f"{len(missing)} missing [{show(missing)}], {len(unexpected)} unexpected [{show(unexpected)}], "
            f"{len(shapes)} shape mismatches [{show(shapes)}]. Was it trained with another model config? "
            "Use the config saved next to the checkpoint (.hydra/config.yaml)."
        )
    net.load_state_dict(state)
    return net
