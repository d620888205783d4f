"""Load a released Direct3D-S2 folder (config.yaml + five ``model_*.ckpt``) into d3ds2 models, strictly.

Every checkpoint is read with :func:`d3ds2.checkpoint.load_checkpoint` (``weights_only``, memory-mapped), its
top-level keys checked, and each state dict converted through the explicit key map of
:mod:`d3ds2.official.keymap`: a missing, unexpected or mis-shaped tensor is an error that names the file, the
key and what was expected, with a hint when the file belongs to another release version or another model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from .config import ReleaseConfig, build_model, kind_of, read_release_config
from .keymap import key_map, shape_of

# file -> {top-level key: config section}
RELEASE_FILES = {
    "model_dense.ckpt": {"vae": "dense_vae", "dit": "dense_dit"},
    "model_sparse_512.ckpt": {"vae": "sparse_vae_512", "dit": "sparse_dit_512"},
    "model_sparse_1024.ckpt": {"vae": "sparse_vae_1024", "dit": "sparse_dit_1024"},
    "model_refiner.ckpt": {"refiner": "refiner"},
    "model_refiner_1024.ckpt": {"refiner": "refiner_1024"},
}
SECTION_FILE = {sec: (f, key) for f, keys in RELEASE_FILES.items() for key, sec in keys.items()}
FETCH_HINT = ("download the release folder again (huggingface-cli download wushuang98/Direct3D-S2 --include "
              "'direct3d-s2-v-1-1/*' --local-dir DIR; 'direct3d-s2-v-1-0/*' for v1.0)")


class OfficialCheckpointError(ValueError):
    """A released checkpoint that does not match the model its config.yaml describes."""


@dataclass
class OfficialRelease:
    """A loaded release: d3ds2 models by config section, the config, and the source dtype of every official
    tensor (so :func:`d3ds2.official.export.export_release` writes the same bytes back)."""

    path: Path
    config: ReleaseConfig
    models: dict[str, nn.Module]
    dtypes: dict[str, dict[str, torch.dtype]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.config.version


def _show(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def _diagnose(kind: str, got: set[str], want: set[str], version: str) -> str:
    """A hint on why a state dict does not match: another release version or another model."""
    v10_marks = any(".out_layers.3.conv.kernel" in k for k in got if "compression" in k) or "cond_proj.weight" in got
    if kind == "sparse_dit" and v10_marks and version == "v1.1":
        return (" These are v1.0 weights (compression v2 / cond_proj) but config.yaml describes v1.1: use the "
                "config.yaml of the same release folder (direct3d-s2-v-1-0).")
    if kind == "sparse_dit" and not v10_marks and version == "v1.0" and any("compression" in k for k in got):
        return (" These are v1.1 weights (compression v1, no cond_proj) but config.yaml describes v1.0: use the "
                "config.yaml of the same release folder (direct3d-s2-v-1-1).")
    if not got & want:
        return " No key matches: this is the checkpoint of another model (files renamed or swapped?)."
    return " Was config.yaml edited, or does it come from another release?"


def official_to_ours(state: dict, model: nn.Module, kind: str, where: str, version: str = "v1.1") -> dict[str, torch.Tensor]:
    """Check an official state dict against ``model`` (of ``kind``) and convert it to ``model``'s names and shapes.

    where: 'file[key]' for the error messages. Raises :class:`OfficialCheckpointError` on any mismatch."""
    ours = model.state_dict()
    entries = key_map(kind, ours)
    want = {e.official: e for e in entries}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = []
    for name, e in want.items():
        if name in state:
            exp = e.official_shape(shape_of(ours[e.ours]))
            if tuple(state[name].shape) != exp:
                shapes.append(f"{name}: got {tuple(state[name].shape)}, expected {exp}")
    if missing or unexpected or shapes:
        raise OfficialCheckpointError(
            f"{where} does not match the {kind} of config.yaml ({version}): {len(missing)} missing "
            f"[{_show(missing)}], {len(unexpected)} unexpected [{_show(unexpected)}], {len(shapes)} mis-shaped "
            f"[{_show(shapes, 3)}].{_diagnose(kind, set(state), set(want), version)}")
    return {e.ours: e.to_ours(state[e.official], shape_of(ours[e.ours])) for e in entries}


def read_checkpoint(path: Path) -> dict:
    """The top-level dict of one release file; a clear error when it is missing, truncated or not tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the release folder (expected {', '.join(RELEASE_FILES)} and "
                                f"config.yaml); {FETCH_HINT}")
    try:
        ckpt = load_checkpoint(path, "d3ds2.official", "the Direct3D-S2 release")
    except RuntimeError as e:
        raise OfficialCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt "
                                      f"download?): {e}. {FETCH_HINT}") from e
    if not isinstance(ckpt, dict):
        raise OfficialCheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a dict of state dicts; {FETCH_HINT}")
    return ckpt


def load_section(cfg: ReleaseConfig, section: str, folder: Path, ckpt: dict | None = None) -> tuple[nn.Module, dict]:
    """Build ``section``'s model from ``cfg`` and load its weights -> (model in eval mode, source dtypes)."""
    fname, key = SECTION_FILE[section]
    path = folder / fname
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    expected = sorted(RELEASE_FILES[fname])
    if key not in ckpt:
        owner = [f for f, keys in RELEASE_FILES.items() if sorted(keys) == sorted(ckpt)]
        hint = f" (its keys {sorted(ckpt)} are those of {owner[0]})" if owner and owner[0] != fname else ""
        raise OfficialCheckpointError(f"{path}: top-level key {key!r} missing; expected keys {expected}, found "
                                      f"{sorted(map(str, ckpt))}{hint}. The file is not {fname} of a release; {FETCH_HINT}")
    state = ckpt[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}[{key!r}]: expected a state dict of tensors")
    model = build_model(cfg, section)
    converted = official_to_ours(state, model, kind_of(section), f"{path}[{key!r}]", cfg.version)
    model.load_state_dict(converted, strict=True)
    return model.eval(), {k: v.dtype for k, v in state.items()}


def load_release(path: str | Path, sections: tuple[str, ...] | None = None) -> OfficialRelease:
    """Load the models of a release folder (all eight, or ``sections`` of config.yaml) on the CPU, float32."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; pass the release folder holding config.yaml and model_*.ckpt; "
                                f"{FETCH_HINT}")
    cfg = read_release_config(folder)
    sections = tuple(sections or SECTION_FILE)
    unknown = [s for s in sections if s not in SECTION_FILE]
    if unknown:
        raise ValueError(f"unknown release sections {unknown}; choose from {sorted(SECTION_FILE)}")
    for s in sections:  # every file present before the (slow) loading starts
        if not (folder / SECTION_FILE[s][0]).is_file():
            read_checkpoint(folder / SECTION_FILE[s][0])
    models, dtypes, cache = {}, {}, {}
    for s in sections:
        fname = SECTION_FILE[s][0]
        if fname not in cache:
            cache = {fname: read_checkpoint(folder / fname)}  # one file's tensors at a time
        models[s], dtypes[s] = load_section(cfg, s, folder, cache[fname])
    return OfficialRelease(folder, cfg, models, dtypes)
