"""d3ds2 models -> the official Direct3D-S2 file layout and key names (runs in the official code).

:func:`official_state_dict` converts one model; :func:`export_release` writes a whole release folder
(config.yaml + the five ``model_*.ckpt``) from d3ds2 models, e.g. after fine-tuning the 512 DiT.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .config import kind_of, release_config
from .keymap import key_map
from .loading import RELEASE_FILES, SECTION_FILE, OfficialRelease


def official_state_dict(model: nn.Module, section: str, dtypes: dict[str, torch.dtype] | None = None,
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Official names and layouts of ``model``'s tensors (CPU). ``dtypes``: official name -> dtype to write (the
    dtypes a release was loaded with, for a bit-identical round trip); else ``dtype`` for floating tensors,
    else the model's own dtypes."""
    state = model.state_dict()
    out = {}
    for e in key_map(kind_of(section), state):
        t = e.to_official(state[e.ours].detach().cpu())
        if dtypes is not None and e.official in dtypes:
            t = t.to(dtypes[e.official])
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[e.official] = t.contiguous()
    return out


def _write_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def export_release(models: dict[str, nn.Module], out_dir: str | Path, config: dict | None = None,
                   dtypes: dict[str, dict[str, torch.dtype]] | None = None, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write ``models`` (config section -> d3ds2 model; all eight) as a release folder ``out_dir``.

    config: the config.yaml content (default: that of a loaded release, else the official v1.1 values);
    dtypes: per section, official name -> dtype (from :class:`OfficialRelease`); otherwise floating tensors are
    written in ``dtype`` (official checkpoints: float16; None keeps the model's dtypes)."""
    from omegaconf import OmegaConf

    missing = [s for s in SECTION_FILE if s not in models]
    if missing:
        raise ValueError(f"export_release needs all eight models; missing {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config or release_config("v1.1")), out / "config.yaml")
    for fname, keys in RELEASE_FILES.items():
        ckpt = {key: official_state_dict(models[sec], sec, (dtypes or {}).get(sec), dtype) for key, sec in keys.items()}
        _write_atomic(ckpt, out / fname)
    return out


def export_loaded_release(release: OfficialRelease, out_dir: str | Path) -> Path:
    """Write a loaded (possibly fine-tuned) release back with its own config.yaml and tensor dtypes."""
    return export_release(release.models, out_dir, release.config.sections, release.dtypes, None)
