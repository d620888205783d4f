"""Shape-image alignment metrics (the paper's image-to-3D evaluation): ULIP-2, Uni3D and OpenShape point
encoders with the image towers they were aligned with; score = cosine similarity of a generated shape's
embedding with its input image's (``python evaluate.py ... image_dir=DIR alignment.models=[...]``)."""
from __future__ import annotations

import torch

from .base import AlignmentModel
from .openshape import OpenShapeAlignment
from .points import coloured_surface_points, farthest_point_sample, knn, knn_patches, normalise_unit_sphere
from .scoring import alignment_scores, match_images
from .ulip1 import ULIP1Alignment
from .ulip2 import ULIP2Alignment
from .uni3d import Uni3DAlignment

ALIGNMENT_MODELS = {"ulip2": ULIP2Alignment, "uni3d": Uni3DAlignment, "openshape": OpenShapeAlignment,
                    "ulip1": ULIP1Alignment}


def load_alignment_model(name: str, ckpt: str | None, image_tower: str | None = None, device: str = "auto",
                         trust_pickle: bool = False, protocol=None) -> AlignmentModel:
    """The released checkpoint ``ckpt`` of alignment model ``name`` (a key of ALIGNMENT_MODELS) on ``device``,
    set up for ``protocol`` (an :class:`~d3ds2.eval.protocols.AlignmentProtocol`; None: ``d3ds2``).

    ``image_tower``: ULIP-2 / OpenShape: a transformers CLIP directory or hub id (None: ViT-bigG-14, what both
    were aligned with); Uni3D: the OpenCLIP EVA02-E-14-plus checkpoint file (required to score images);
    ULIP-1: unused (its SLIP ViT-B/16 is in the checkpoint).
    """
    from ..protocols import get_protocol

    protocol = protocol or get_protocol("d3ds2")
    if name not in ALIGNMENT_MODELS:
        raise KeyError(f"alignment model {name!r} unknown; choose from {sorted(ALIGNMENT_MODELS)}")
    if name not in protocol.models:
        raise ValueError(f"alignment model {name!r} is not part of protocol {protocol.name!r} (its models: "
                         f"{list(protocol.models)})")
    if ckpt is None:
        raise ValueError(f"alignment.{name}.ckpt is not set: give the path of the released {name} checkpoint "
                         "(docs/evaluation.md lists the files)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda and not protocol.float32 else torch.float32
    if name == "uni3d":
        if image_tower is None:
            raise ValueError("alignment.uni3d.image_tower is not set: give the OpenCLIP EVA02-E-14-plus checkpoint "
                             "file Uni3D was aligned with (docs/evaluation.md)")
        model = Uni3DAlignment.from_checkpoint(ckpt, clip_checkpoint=image_tower, dtype=dtype,
                                               trust_pickle=trust_pickle)
    elif name == "ulip1":
        model = ULIP1Alignment.from_checkpoint(ckpt, trust_pickle=trust_pickle)
    else:
        model = ALIGNMENT_MODELS[name].from_checkpoint(ckpt, image_tower=image_tower, trust_pickle=trust_pickle)
    return protocol.apply(model.to(device).eval())


__all__ = ["ALIGNMENT_MODELS", "AlignmentModel", "OpenShapeAlignment", "ULIP1Alignment", "ULIP2Alignment",
           "Uni3DAlignment",
           "alignment_scores", "coloured_surface_points", "farthest_point_sample", "knn", "knn_patches",
           "load_alignment_model", "match_images", "normalise_unit_sphere"]
