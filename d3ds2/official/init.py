"""``official:DIR[#section]``: initialise a d3ds2 net from a released Direct3D-S2 folder (fine-tuning).

``DIR`` is a release folder (config.yaml + model_*.ckpt); ``section`` (a config.yaml section such as
``sparse_dit_1024``) is optional: by default it follows the net (SparseDiT: ``sparse_dit_512``, or
``sparse_dit_1024`` when its pe_factor is 0.5; SparseSDFVAE: ``sparse_vae_512``; DenseDiT: ``dense_dit``;
DenseShapeVAE: ``dense_vae``; the refiners by class). The net must have the release's hyper-parameters.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

PREFIX = "official:"


def is_official_spec(spec) -> bool:
    """Whether an ``init_from`` / checkpoint value names a release (``official:DIR[#section]``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def default_section(net: nn.Module) -> str:
    """The release section whose weights fit ``net`` (see the module docstring)."""
    name = type(net).__name__
    if name == "SparseDiT":
        return "sparse_dit_1024" if getattr(net, "pe_factor", 1.0) == 0.5 else "sparse_dit_512"
    sections = {"SparseSDFVAE": "sparse_vae_512", "DenseDiT": "dense_dit", "DenseShapeVAE": "dense_vae",
                "VoxelRefiner": "refiner", "SignRefiner": "refiner_1024"}
    if name not in sections:
        raise ValueError(f"official: no released weights for a {name}; the release holds "
                         "SparseDiT, SparseSDFVAE, DenseDiT, DenseShapeVAE and the two refiners")
    return sections[name]


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """``official:DIR[#section]`` -> (DIR, section or None)."""
    body = spec[len(PREFIX):]
    folder, _, section = body.partition("#")
    if not folder:
        raise ValueError(f"{spec!r}: give the release folder, e.g. official:/data/Direct3D-S2/direct3d-s2-v-1-1")
    return Path(folder).expanduser(), section or None


def load_official_weights(spec: str, net: nn.Module) -> nn.Module:
    """Load the released weights named by ``spec`` into ``net`` (strict; errors name the mismatching keys)."""
    from .config import read_release_config
    from .loading import load_section

    folder, section = parse_spec(spec)
    section = section or default_section(net)
    model, _ = load_section(read_release_config(folder), section, folder)
    state, own = model.state_dict(), net.state_dict()
    bad = sorted(set(state) ^ set(own)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{spec}: the {section} of {folder} does not fit this {type(net).__name__} "
                         f"({len(bad)} keys differ, e.g. {bad[:4]}); build the net with the release's hyper-parameters "
                         f"(d3ds2/configs/model/dit_v11.yaml for v1.1, dit_v10.yaml for v1.0)")
    net.load_state_dict(state)
    return net
