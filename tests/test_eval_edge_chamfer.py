"""Edge Chamfer distance on cubes against a hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from d3ds2.geometry.metrics import edge_chamfer, mesh_metrics


def cube_ecd(a: float, b: float) -> float:
    """Hand computation: edge Chamfer between concentric axis-aligned cubes of half sizes a < b.

    Every edge point (x, a, a) of the small cube is sqrt(2) d from the big cube's edges (d = b - a: the parallel
    edge at (x, b, b) for |x| <= a < b, no other is nearer). An edge point (x, b, b) of the big cube is
    sqrt(max(|x| - a, 0)^2 + 2 d^2) from the small cube's edges; averaged over x uniform in [-b, b]:
    (a sqrt(2) d + I) / b with I = int_0^d sqrt(u^2 + c^2) du, c^2 = 2 d^2,
    I = (d sqrt(d^2 + c^2) + c^2 ln((d + sqrt(d^2 + c^2)) / c)) / 2.
    """
    d = b - a
    c = math.sqrt(2) * d
    integral = 0.5 * (d * math.sqrt(d * d + c * c) + c * c * math.log((d + math.sqrt(d * d + c * c)) / c))
    small_to_big = math.sqrt(2) * d
    big_to_small = (a * math.sqrt(2) * d + integral) / b
    return 0.5 * (small_to_big + big_to_small)


def test_edge_chamfer_of_two_cubes_matches_the_hand_computation():
    small, big = trimesh.creation.box((1.0, 1.0, 1.0)), trimesh.creation.box((1.2, 1.2, 1.2))
    expect = cube_ecd(0.5, 0.6)
    got = edge_chamfer(small, big, angle_deg=15.0, spacing=0.001)
    assert got == pytest.approx(expect, rel=2e-3)
    assert edge_chamfer(big, small, spacing=0.001) == pytest.approx(expect, rel=2e-3)  # symmetric
    assert edge_chamfer(small, small.copy(), spacing=0.001) == pytest.approx(0.0, abs=1e-12)
    # a rotated cube: its edges are elsewhere, the distance grows
    turned = small.copy()
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 4, [0, 0, 1]))
    assert edge_chamfer(turned, small, spacing=0.001) > 0.05


def test_edge_chamfer_undefined_without_reference_edges_and_in_mesh_metrics():
    sphere = trimesh.creation.uv_sphere(0.5, count=(64, 64))  # dihedral angles ~6 deg: no sharp edge at 15
    cube = trimesh.creation.box((1.0, 1.0, 1.0))
    assert edge_chamfer(cube, sphere) is None
    assert edge_chamfer(sphere, cube) == float("inf")
    row = mesh_metrics(cube, trimesh.creation.box((1.2, 1.2, 1.2)), n_points=2000, edge_angle=15.0,
                       edge_spacing=0.001)
    assert row["edge_chamfer"] == pytest.approx(cube_ecd(0.5, 0.6), rel=2e-3)
    assert "edge_chamfer" not in mesh_metrics(cube, cube, n_points=2000)  # off unless asked


def test_segment_sampling_equals_per_segment_linspace():
    from d3ds2.geometry.sharp_edges import sample_segments

    rng = np.random.default_rng(0)
    segments = rng.standard_normal((500, 2, 3)) * rng.uniform(0.001, 1.0, (500, 1, 1))
    spacing = 0.01
    n = np.maximum(1, np.ceil(np.linalg.norm(segments[:, 1] - segments[:, 0], axis=1) / spacing).astype(int))
    expect = np.concatenate([a + (b - a) * np.linspace(0.0, 1.0, k + 1)[:, None] for (a, b), k in zip(segments, n)])
    assert np.array_equal(sample_segments(segments, spacing), expect)
