"""Shape-image alignment metrics (the paper's image-to-3D evaluation): ULIP-2, Uni3D and OpenShape point
encoders with the image towers they were aligned with; score = cosine similarity of a generated shape's
embedding with its input image's."""
from .base import AlignmentModel
from .points import coloured_surface_points, farthest_point_sample, knn, knn_patches, normalise_unit_sphere

__all__ = ["AlignmentModel", "coloured_surface_points", "farthest_point_sample", "knn", "knn_patches",
           "normalise_unit_sphere"]
