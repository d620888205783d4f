"""Train / val assignment of meshes: deterministic, stable when meshes are added, optionally pinned by a list.

A mesh's split depends only on its name (its path relative to the input folder, so moving the corpus keeps
the split) and ``val_fraction``: val when the first 8 bytes of SHA-256(name) / 2^64 < val_fraction. Adding or
removing other meshes never moves it. A split file pins chosen meshes: lines ``train NAME`` or ``val NAME``
(``#`` comments), NAME being the relative path, the file name or the sample key.
"""
from __future__ import annotations

import hashlib
import os

from .layout import SPLITS


def split_name(path: str, input_root: str | None) -> str:
    """The name a mesh's split is hashed from: its path relative to ``input_root`` (else the absolute path)."""
    path = os.path.abspath(path)
    if input_root is not None:
        rel = os.path.relpath(path, os.path.abspath(input_root))
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return path


def hashed_split(name: str, val_fraction: float) -> str:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: expected a fraction in [0, 1)")
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


def read_split_file(path: str) -> dict[str, str]:
    """``train NAME`` / ``val NAME`` lines -> {NAME: split}; a clear error naming the line otherwise."""
    pinned: dict[str, str] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            split, _, name = line.partition(" ")
            if split not in SPLITS or not name.strip():
                raise ValueError(f"{path}:{n}: {line!r}; expected 'train NAME' or 'val NAME'")
            pinned[name.strip()] = split
    return pinned


def assign_split(path: str, key: str, input_root: str | None, val_fraction: float,
                 pinned: dict[str, str] | None = None) -> str:
    """'train' or 'val' for one mesh (pinned by name, file name or key first, else hashed)."""
    name = split_name(path, input_root)
    for candidate in (name, os.path.basename(path), key):
        if pinned and candidate in pinned:
            return pinned[candidate]
    return hashed_split(name, val_fraction)
