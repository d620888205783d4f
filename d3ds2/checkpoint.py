"""Weights in: every checkpoint the project reads goes through :func:`load_checkpoint` (tensors only, never
unpickled code unless the caller opts in; ``.safetensors`` read without pickle at all), and a d3ds2 net's
weights load with a mismatch report. Weights out: :func:`export_safetensors`."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

TRUST_PICKLE_ENV = "D3DS2_TRUST_PICKLE"  # =1: every loader may fully unpickle (files you made or trust only)
SAFETENSORS_FORMAT = "d3ds2-state-dict"  # metadata "format" of exported weights


class CheckpointUnreadable(RuntimeError):
    """The file is truncated or damaged (not a refusal of its contents)."""


def pickle_trusted(trust_pickle: bool = False) -> bool:
    """The caller's opt-in, or the process-wide one (``D3DS2_TRUST_PICKLE=1``)."""
    return trust_pickle or os.environ.get(TRUST_PICKLE_ENV, "") == "1"


def _refusal_reason(e: Exception) -> str:
    """The line of torch's weights-only error that names the refused global (the rest is generic advice)."""
    lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
    return lines[0] if lines else str(e).splitlines()[0]


def _load_safetensors(path: str, who: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {"state_dict": load_file(path, device="cpu")}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointUnreadable(f"{who}: cannot read {path!r} ({e}): the file is truncated or damaged; "
                                   "export it again") from e


def load_checkpoint(path: str | os.PathLike, who: str = "d3ds2", source: str = "the right checkpoint",
                    trust_pickle: bool = False, safe_globals: tuple = ()) -> dict:
    """torch.load a checkpoint on the CPU, tensors (and ``safe_globals``) only (``weights_only``) unless
    ``trust_pickle`` (or ``D3DS2_TRUST_PICKLE=1``) allows a full unpickle; a ``.safetensors`` file comes back
    as ``{"state_dict": tensors}``. Errors name the file, where to get it (``source``) and the opt-in.

    Raises CheckpointUnreadable for a truncated or damaged file, RuntimeError for refused contents.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}: checkpoint file {path!r} not found; download {source} and pass its path")
    if path.endswith(".safetensors"):
        return _load_safetensors(path, who)

    def load(weights_only: bool, mmap: bool):
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)

    try:
        return load(True, True)  # zipfile checkpoints: memory-mapped, no copy
    except pickle.UnpicklingError as e:
        refused = e
    except Exception:  # noqa: BLE001 - legacy format (no mmap) or a damaged file: told apart below
        try:
            return load(True, False)
        except pickle.UnpicklingError as e:
            refused = e
        except Exception as e:  # noqa: BLE001 - zip reader / EOF errors of a truncated or damaged file
            raise CheckpointUnreadable(f"{who}: cannot read checkpoint {path!r} ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}): the file is truncated or "
                                       f"damaged; use an intact copy of {source}") from e
    if not pickle_trusted(trust_pickle):
        raise RuntimeError(
            f"{who}: refusing to unpickle {path!r}: it holds objects outside torch.load(weights_only=True)'s "
            f"allowlist ({_refusal_reason(refused)}), and unpickling them can run any code. d3ds2 checkpoints "
            f"never need this. Only for a file you trust: set {TRUST_PICKLE_ENV}=1 (or pass trust_pickle=True) "
            "to load it with full unpickling") from refused
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
    ckpt = load_checkpoint(path, type(net).__name__, "a d3ds2 training checkpoint (.ckpt, .safetensors) or a state dict")
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


def export_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike | None = None, prefer_ema: bool = True) -> Path:
    """Write the weights of a checkpoint as ``.safetensors`` (no pickle; loads back through
    :func:`load_checkpoint` / :func:`load_net_weights` like the ``.ckpt``).

    The file holds the Lightning ``state_dict`` (``net.*`` weights, with the EMA shadow in their place when
    present and ``prefer_ema``, plus the module's other buffers such as a DiT's latent statistics); optimiser
    and loop state are left out. ``out`` defaults to the checkpoint's path with the ``.safetensors`` suffix, so
    the run's ``config_resolved.yaml`` is found from it as from the ``.ckpt``. Returns the path written.
    """
    from safetensors.torch import save_file

    ckpt = Path(ckpt)
    out = Path(out) if out else ckpt.with_suffix(".safetensors")
    loaded = load_checkpoint(ckpt, "export_safetensors", "a d3ds2 training checkpoint (.ckpt)")
    state = dict(loaded.get("state_dict", loaded))
    ema = prefer_ema and "ema" in loaded
    if ema:
        for k, v in loaded["ema"].items():
            if f"net.{k}" in state:
                state[f"net.{k}"] = v.to(state[f"net.{k}"].dtype)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    metadata = {"format": SAFETENSORS_FORMAT, "source": ckpt.name, "ema": str(ema).lower(),
                "global_step": str(loaded.get("global_step", ""))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out
