"""Type-check a composed training config against the signatures of its ``_target_`` classes, before anything
is built: ``trainer.max_steps=abc`` fails at once, naming the key, not minutes later inside Lightning."""
from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_SEQUENCES = (list, tuple, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (a config value) fits ``annotation``; annotations this cannot judge accept anything."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if isinstance(value, DictConfig) and "_target_" in value:
        return True  # an object built by Hydra: its own keys are checked separately
    if origin is not None:
        if origin in _SEQUENCES:
            return isinstance(value, ListConfig)
        if origin in _MAPPINGS:
            return isinstance(value, DictConfig)
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _hints(target: str) -> dict[str, Any]:
    """Resolved parameter annotations of a ``_target_`` (its ``__init__`` for a class); {} if unresolvable."""
    try:
        obj = get_object(target)
        fn = obj.__init__ if inspect.isclass(obj) else obj
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unimportable target or unresolvable annotation: instantiate will report
        return {}


def config_type_errors(node: Any, path: str) -> list[str]:
    """One message per value under ``node`` whose type its ``_target_``'s signature rejects."""
    errors: list[str] = []
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            errors += config_type_errors(node._get_node(i), f"{path}[{i}]")
        return errors
    if not isinstance(node, DictConfig):
        return errors
    hints = _hints(node["_target_"]) if "_target_" in node else {}
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # missing (???) or a broken interpolation: Hydra reports those itself
            continue
        if key in hints and not _accepts(hints[key], value):
            errors.append(f"{path}.{key}={value!r} ({type(value).__name__}): {node['_target_']} expects "
                          f"{key}: {_show(hints[key])}")
        errors += config_type_errors(value, f"{path}.{key}")
    return errors


def _show(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def check_config_types(cfg: DictConfig, groups: tuple[str, ...] = ("trainer", "data", "model", "callbacks", "logger")) -> None:
    """Raise a ValueError listing every mistyped key of ``groups`` (e.g. ``trainer.max_steps='abc'``)."""
    errors = [e for g in groups if cfg.get(g) is not None for e in config_type_errors(cfg[g], g)]
    if errors:
        raise ValueError("config values of the wrong type (fix the override or the experiment file):\n  "
                         + "\n  ".join(errors))
