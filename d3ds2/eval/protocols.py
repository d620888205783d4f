"""Pinned shape-image alignment protocols: how points are sampled, normalised and coloured, in which precision,
and how images are preprocessed. Alignment scores move with every one of these, so a number is only
comparable with numbers computed under the same protocol; ``summary.json`` names the one used.

- ``d3ds2`` (default): each encoder as its own authors evaluate it: 10,000 area-uniform surface points (8,192 for
  ULIP-1), y up, each encoder's unit-sphere normalisation, mesh colours where present else rgb 0.4, images
  through the conditioner's foreground crop on white; Uni3D / EVA02-E in bf16 on CUDA. Models: ulip2, uni3d,
  openshape (and ulip1).
- ``flashvdm``: Tencent-Hunyuan/FlashVDM ``evaluation/`` (the only public evaluation script of this model
  family): 8,192 points of ``trimesh.sample.sample_surface``, no normalisation, float32, cosine of
  L2-normalised embeddings; ULIP = ULIP-1 PointBERT (xyz only) with its SLIP ViT-B/16; Uni3D-g with
  EVA02-E-14-plus and a constant grey rgb of 100/255 (mesh colours ignored); images ``convert('RGB')`` (alpha
  dropped) then the towers' timm / OpenCLIP evaluation transform (resize shorter side, centre crop).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import trimesh

from .alignment.base import AlignmentModel
from .alignment.points import DEFAULT_RGB, coloured_surface_points


@dataclass(frozen=True)
class AlignmentProtocol:
    """How shapes and images are prepared for the alignment encoders.

    models: the encoders the protocol defines (column names); n_points: surface samples per shape (None: each
    encoder's own count); normalise: unit-sphere normalisation before the encoder; rgb: colour of points
    without one; mesh_colours: take vertex / face / texture colours where the mesh has them; float32: every
    encoder in float32 (else bf16 for Uni3D and its tower on CUDA); centre_crop_pct: per model, the crop ratio
    of the torchvision-style image transform (no entry: the conditioner's foreground crop on white).
    """

    name: str
    models: tuple[str, ...]
    n_points: int | None
    normalise: bool
    rgb: float
    mesh_colours: bool
    float32: bool
    centre_crop_pct: dict = field(default_factory=dict)

    def apply(self, model: AlignmentModel) -> AlignmentModel:
        """Set ``model``'s point count, normalisation and image preprocessing to this protocol's."""
        if model.name not in self.models:
            raise ValueError(f"alignment model {model.name!r} is not part of protocol {self.name!r} (its models: "
                             f"{list(self.models)}); pick one of those or another protocol")
        if self.n_points is not None:
            model.n_points = self.n_points
        model.normalise = self.normalise
        tower = getattr(model, "image_tower", None)
        if tower is not None:
            tower.centre_crop_pct = self.centre_crop_pct.get(model.name)
        return model

    def surface_points(self, mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
        """n surface samples [n, 6] float32 (xyz in the mesh frame + rgb) as this protocol colours them."""
        return coloured_surface_points(mesh, n, seed, default_rgb=self.rgb, mesh_colours=self.mesh_colours)

    def describe(self) -> dict:
        """A JSON-able record of the protocol (written into summary.json)."""
        return {"name": self.name, "models": list(self.models), "n_points": self.n_points or "each model's own",
                "normalise": self.normalise, "rgb": self.rgb, "mesh_colours": self.mesh_colours,
                "float32": self.float32, "image_preprocessing": {m: (f"rgb convert, centre crop {p}" if m in
                                                                     self.centre_crop_pct else "foreground on white")
                                                                 for m in self.models}}


PROTOCOLS = {
    "d3ds2": AlignmentProtocol("d3ds2", ("ulip2", "uni3d", "openshape", "ulip1"), n_points=None, normalise=True,
                               rgb=DEFAULT_RGB, mesh_colours=True, float32=False),
    "flashvdm": AlignmentProtocol("flashvdm", ("ulip1", "uni3d"), n_points=8192, normalise=False, rgb=100 / 255,
                                  mesh_colours=False, float32=True, centre_crop_pct={"ulip1": 0.9, "uni3d": 1.0}),
}


def get_protocol(name: str) -> AlignmentProtocol:
    """The preset ``name`` (a key of PROTOCOLS); KeyError naming the choices otherwise."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown alignment protocol {name!r}; choose protocol= one of {sorted(PROTOCOLS)} "
                       "(docs/evaluation.md describes them)")
    return PROTOCOLS[name]
