"""Say when a slower path is taken: a faster backend was asked for (or is the default) but cannot run here.

Each fallback warns once per process (:func:`warn_fallback`) with what runs instead, the reason and the fix,
as a :class:`SlowPathWarning`; ``warnings.simplefilter("ignore", SlowPathWarning)`` silences them all.
"""
from __future__ import annotations

import warnings


class SlowPathWarning(UserWarning):
    """A slower code path runs because the faster one cannot run on this machine or these inputs."""


_warned: set[str] = set()


def warn_fallback(key: str, message: str) -> None:
    """Warn ``message`` (what runs instead, why, and how to get the fast path) the first time ``key`` falls back."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, SlowPathWarning, stacklevel=3)
