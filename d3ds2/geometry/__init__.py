"""Geometry: mesh IO, normalisation, watertight repair, sparse SDF, sharp edges, rendering, metrics."""
