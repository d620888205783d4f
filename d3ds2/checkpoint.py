"""Weights in: every checkpoint the project reads goes through :func:`load_checkpoint` (tensors only, never
unpickled code unless the caller opts in), and a d3ds2 net's weights load with a mismatch report."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn


def load_checkpoint(path: str | os.PathLike, who: str = "d3ds2", source: str = "the right checkpoint",
                    trust_pickle: bool = False, safe_globals: tuple = ()) -> dict:
    """torch.load a checkpoint on the CPU, tensors (and ``safe_globals``) only (``weights_only``) unless
    ``trust_pickle`` allows a pickle fallback; errors name the file and where to get it (``source``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: checkpoint file {path!r} not found; download {source} and pass its path")

    def load(weights_only: bool, mmap: bool):
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)

    try:
        return load(True, True)  # zipfile checkpoints: memory-mapped, no copy
    except Exception:  # noqa: BLE001 - legacy format (no mmap) or a refused object: retried below
        pass
    try:
        return load(True, False)
    except Exception as e:  # noqa: BLE001 - an object outside the weights-only allowlist
        if not trust_pickle:
            raise RuntimeError(f"{who}: {path!r} holds objects torch.load(weights_only=True) refuses ({e}); if "
                               "you trust the file, pass trust_pickle=True to unpickle it") from e
    return load(False, False)


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
    made for another architecture or configuration. ``official:DIR[#section]`` loads released Direct3D-S2
    weights (see :mod:`d3ds2.official.init`).
    """
    if isinstance(path, str) and path.startswith("official:"):
        from .official.init import load_official_weights

        return load_official_weights(path, net)
    path = Path(path)
    ckpt = load_checkpoint(path, type(net).__name__, "a d3ds2 training checkpoint (.ckpt) or a state dict")
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
