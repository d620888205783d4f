"""Evaluation: geometry metrics of generated / reconstructed meshes against references, and the shape-image
alignment metrics (:mod:`d3ds2.eval.alignment`)."""
from .geometry import evaluate_pairs, list_meshes, match_meshes, summarise

__all__ = ["evaluate_pairs", "list_meshes", "match_meshes", "summarise"]
