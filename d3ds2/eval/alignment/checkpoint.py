"""Reading released checkpoints of the alignment encoders: safe loading with a clear error, key and shape
checks against the model, loading into a model built on the meta device."""
from __future__ import annotations

import os

import torch
import torch.nn as nn


def check_state_dict_keys(who: str, got: dict, expected: dict, hint: str) -> None:
    """Raise KeyError naming the missing / unexpected keys of ``got`` (tensors) against ``expected`` (key ->
    shape tuple), then ValueError naming shape mismatches; ``hint`` says which checkpoint was expected."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{who}: the checkpoint does not match the model (expected {hint}); missing keys "
                       f"({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}; unexpected keys "
                       f"({len(unexpected)}): {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    bad = [f"{k}: {tuple(got[k].shape)} != {expected[k]}" for k in expected if tuple(got[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"{who}: shape mismatches (expected {hint}): {bad[:12]}")


def load_checkpoint_file(path: str | os.PathLike, who: str, source: str, trust_pickle: bool = False,
                         safe_globals: tuple = ()) -> dict:
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


def load_into(module: nn.Module, state: dict, dtype: torch.dtype) -> nn.Module:
    """Load ``state`` into a module built on the meta device (no second copy of the weights): floating tensors
    cast to ``dtype``, integer buffers kept."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module
