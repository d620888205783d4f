"""Evaluation: reconstruction / generation geometry metrics over sets of meshes."""
from .geometry import evaluate_pairs, match_meshes, summarise

__all__ = ["evaluate_pairs", "match_meshes", "summarise"]
