"""Released checkpoints of the alignment encoders: key and shape checks against the model, loading into a
model built on the meta device (files are read by :func:`d3ds2.checkpoint.load_checkpoint`)."""
from __future__ import annotations


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


def load_into(module: nn.Module, state: dict, dtype: torch.dtype) -> nn.Module:
    """Load ``state`` into a module built on the meta device (no second copy of the weights): floating tensors
    cast to ``dtype``, integer buffers kept."""
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module
