"""What every shape-image alignment model offers: unit-norm embeddings of point clouds and of images in one
space, and their cosine similarity as the score (the paper's ULIP-2 / Uni3D / OpenShape metrics)."""
from __future__ import annotations

import torch
import torch.nn as nn


class AlignmentModel(nn.Module):
    """A frozen point encoder and the image tower it was aligned with.

    Subclasses set ``name`` (the metric's column name), ``n_points`` (surface samples per shape the encoder
    was trained with; a protocol may change it) and ``image_tower`` (an
    :class:`~d3ds2.eval.alignment.image_tower.ImageTower`: ``preprocess(list) -> [B, 3, S, S]``,
    ``forward([B, 3, S, S]) -> [B, E]``), and implement :meth:`encode_points`.
    """

    name: str = ""
    n_points: int = 10_000
    normalise: bool = True  # centre + scale each cloud to the unit sphere first (off: the FlashVDM protocol)
    image_tower: nn.Module

    def encode_points(self, points: torch.Tensor) -> torch.Tensor:
        """points [B, N, 6] (xyz in the mesh frame, rgb in [0, 1]) -> unit-norm embeddings [B, E]."""
        raise NotImplementedError

    def encode_images(self, images: list) -> torch.Tensor:
        """Paths / PIL images / arrays -> unit-norm embeddings [B, E]."""
        return self.image_tower(self.image_tower.preprocess(images))

    @torch.no_grad()
    def score(self, points: torch.Tensor, images: list) -> torch.Tensor:
        """Cosine similarity [B] of each shape's points [B, N, 6] with its image."""
        return (self.encode_points(points) * self.encode_images(images)).sum(-1)
