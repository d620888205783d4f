"""Alignment scores of a set of meshes with their images: load, sample coloured surface points, embed both
sides, cosine similarity. A mesh or image that fails is reported in its row and skipped, never fatal."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...geometry.mesh_io import load_mesh
from .base import AlignmentModel
from .points import coloured_surface_points

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def match_images(stems: list[str], image_dir: str | Path) -> dict[str, Path]:
    """The image of ``image_dir`` with each stem (any of IMAGE_SUFFIXES); stems without one are left out."""
    images = {p.stem: p for p in sorted(Path(image_dir).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return {s: images[s] for s in stems if s in images}


def alignment_scores(model: AlignmentModel, pairs: list[tuple[Path, Path]], batch_size: int = 8, seed: int = 0,
                     progress: bool = True, protocol=None) -> list[dict]:
    """One dict per (mesh, image) pair: ``{model.name: cosine}``, or ``{model.name + "_error": message}``.

    Each mesh gives ``model.n_points`` coloured surface samples (``seed``), coloured as ``protocol`` says (an
    :class:`~d3ds2.eval.protocols.AlignmentProtocol`; None: mesh colours, else rgb 0.4); batches of
    ``batch_size`` shapes run on the model's device.
    """
    sample = protocol.surface_points if protocol is not None else coloured_surface_points
    device = next(model.parameters()).device
    rows: list[dict] = [{} for _ in pairs]
    batches = range(0, len(pairs), batch_size)
    for start in tqdm(batches, desc=model.name, unit="batch", disable=not progress):
        ok, clouds, images = [], [], []
        for i in range(start, min(start + batch_size, len(pairs))):
            mesh_path, image_path = pairs[i]
            try:
                clouds.append(sample(load_mesh(str(mesh_path)), model.n_points, seed))
                images.append(image_path)
                ok.append(i)
            except Exception as err:  # a broken or empty mesh is reported, never fatal
                rows[i][f"{model.name}_error"] = f"{type(err).__name__}: {err}"
        if not ok:
            continue
        try:
            scores = model.score(torch.from_numpy(np.stack(clouds)).to(device), images).cpu().tolist()
        except Exception:  # e.g. an unreadable image: score the batch one by one to find it
            scores = []
            for cloud, image in zip(clouds, images):
                try:
                    scores.append(model.score(torch.from_numpy(cloud[None]).to(device), [image]).item())
                except Exception as one:
                    scores.append(f"{type(one).__name__}: {one}")
        for i, s in zip(ok, scores):
            rows[i].update({model.name: s} if isinstance(s, float) else {f"{model.name}_error": s})
    return rows
