"""Check our alignment encoders against the official implementations' embeddings on the same inputs.

Whoever has both the released checkpoints and the official code writes a reference ``.npz`` per model
(:func:`write_reference`); this module embeds the same inputs with our encoder and reports the cosine
similarity of every pair (pass: all >= ``min_cosine``, 0.999 by default)::

    python -m d3ds2.eval.alignment.validate --model ulip2 --ckpt ULIP-2-PointBERT-10k-colored-pc-pretrained.pt \\
        --reference ulip2_official.npz [--image-tower DIR] [--protocol d3ds2] [--json report.json]

Reference file (float32 unless noted; M items):

- ``points`` [M, N, 6]: xyz in the mesh frame (y up) + rgb in [0, 1], as our ``encode_points`` reads them; the
  official side applies its own preprocessing to these (``pc_norm``, OpenShape's y/z swap; nothing under the
  FlashVDM protocol) and runs its ``encode_pc``;
- ``point_embeddings`` [M, E]: the official point embeddings (normalised or not);
- optional ``images`` uint8 [M, S, S, 3] already at the tower's input size S, and ``image_embeddings`` [M, E]: the
  official ``encode_image`` of ``Normalize(ToTensor(image))`` with the tower's mean / std.

Exit status 0 when every cosine passes, 1 otherwise (the report names the worst items).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import AlignmentModel

MIN_COSINE = 0.999


def write_reference(path: str | Path, points: np.ndarray, point_embeddings: np.ndarray,
                    images: np.ndarray | None = None, image_embeddings: np.ndarray | None = None) -> Path:
    """Save a reference file in the layout this module reads (see the module docstring)."""
    arrays = {"points": np.asarray(points, np.float32), "point_embeddings": np.asarray(point_embeddings, np.float32)}
    if images is not None:
        arrays["images"] = np.asarray(images, np.uint8)
        arrays["image_embeddings"] = np.asarray(image_embeddings, np.float32)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"reference file {str(path)!r} not found")
    with np.load(path, allow_pickle=False) as f:
        ref = {k: f[k] for k in f.files}
    for key in ("points", "point_embeddings"):
        if key not in ref:
            raise KeyError(f"{path}: no {key!r} array (found {sorted(ref)}); see d3ds2.eval.alignment.validate")
    m = len(ref["points"])
    if ref["points"].ndim != 3 or ref["point_embeddings"].shape[0] != m:
        raise ValueError(f"{path}: points must be [M, N, 6] and point_embeddings [M, E] with the same M; got "
                         f"{ref['points'].shape} and {ref['point_embeddings'].shape}")
    if ("images" in ref) != ("image_embeddings" in ref):
        raise KeyError(f"{path}: 'images' and 'image_embeddings' go together")
    return ref


def _cosines(ours: torch.Tensor, theirs: np.ndarray, what: str) -> list[float]:
    theirs_t = torch.from_numpy(np.asarray(theirs, np.float32)).to(torch.float64)
    if tuple(theirs_t.shape) != tuple(ours.shape):
        raise ValueError(f"{what}: reference embeddings {tuple(theirs_t.shape)} vs ours {tuple(ours.shape)}; is this "
                         "the reference of the same model?")
    return F.cosine_similarity(ours.double(), theirs_t, dim=-1).tolist()


@torch.no_grad()
def validate_embeddings(model: AlignmentModel, reference: str | Path, min_cosine: float = MIN_COSINE,
                        batch_size: int = 4) -> dict:
    """Embed the reference inputs with ``model`` and compare: {"model", "reference", "min_cosine", "passed",
    "points": {"cosine": [...], "min", "worst"}, ["images": {...}]}."""
    ref = _read(Path(reference))
    device = next(model.parameters()).device
    report: dict = {"model": model.name, "reference": str(reference), "min_cosine": min_cosine}
    pts = torch.from_numpy(ref["points"])
    ours = torch.cat([model.encode_points(pts[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(pts), batch_size)])
    parts = {"points": _cosines(ours, ref["point_embeddings"], "points")}
    if "images" in ref:
        pix = torch.from_numpy(ref["images"]).permute(0, 3, 1, 2).float() / 255.0
        ours = torch.cat([model.image_tower(pix[i:i + batch_size]).float().cpu()
                          for i in range(0, len(pix), batch_size)])
        parts["images"] = _cosines(ours, ref["image_embeddings"], "images")
    for name, cos in parts.items():
        report[name] = {"cosine": cos, "min": min(cos), "worst": int(np.argmin(cos))}
    report["passed"] = all(report[name]["min"] >= min_cosine for name in parts)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare our alignment embeddings with the official ones (.npz).")
    parser.add_argument("--model", required=True, help="ulip2 | uni3d | openshape | ulip1")
    parser.add_argument("--ckpt", required=True, help="the released checkpoint of that model")
    parser.add_argument("--image-tower", default=None, help="as alignment.<model>.image_tower of evaluate.py")
    parser.add_argument("--reference", required=True, help="the .npz written from the official code")
    parser.add_argument("--protocol", default="d3ds2", help="d3ds2 | flashvdm: how the official side prepared points")
    parser.add_argument("--min-cosine", type=float, default=MIN_COSINE)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trust-pickle", action="store_true")
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    from . import load_alignment_model
    from ..protocols import get_protocol

    model = load_alignment_model(args.model, args.ckpt, args.image_tower, args.device, args.trust_pickle,
                                 protocol=get_protocol(args.protocol))
    report = validate_embeddings(model, args.reference, args.min_cosine)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for name in ("points", "images"):
        if name in report:
            r = report[name]
            print(f"{args.model} {name}: {len(r['cosine'])} items, min cosine {r['min']:.6f} (item {r['worst']})")
    print(f"{'PASS' if report['passed'] else 'FAIL'} (threshold {args.min_cosine})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
