"""Chamfer retrieval scoring (d3ds2.eval.retrieval): brute-force reference, hand-made meshes, misses."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from d3ds2.eval.retrieval import chamfer_matrix, retrieval, surface_points


def _brute_chamfer(a: np.ndarray, b: np.ndarray) -> float:
    d = np.linalg.norm(a[:, None, :].astype(np.float64) - b[None, :, :].astype(np.float64), axis=-1)
    return 0.5 * (d.min(1).mean() + d.min(0).mean())


def test_chamfer_matrix_matches_brute_force():
    rng = np.random.default_rng(7)
    preds = [rng.normal(size=(n, 3)) for n in (50, 80)] + [None]
    refs = [rng.normal(size=(n, 3)) * s for n, s in ((60, 1.0), (40, 0.5), (70, 2.0))]
    m = chamfer_matrix(preds, refs)
    assert m.shape == (3, 3)
    for i in range(2):
        for j in range(3):
            assert m[i, j] == pytest.approx(_brute_chamfer(preds[i], refs[j]), rel=1e-12)
    assert np.isinf(m[2]).all()


def _shapes() -> dict[str, trimesh.Trimesh]:
    return {"sphere": trimesh.creation.icosphere(4, radius=0.9), "cube": trimesh.creation.box((1.6, 1.6, 1.6)),
            "torus": trimesh.creation.torus(0.65, 0.25)}


def test_each_perturbed_shape_retrieves_itself():
    rng = np.random.default_rng(3)
    refs = _shapes()
    gens = []
    for mesh in refs.values():  # a "generated" copy: remeshed, noisy, slightly scaled and shifted
        g = mesh.subdivide()
        g.vertices = g.vertices * 0.96 + rng.normal(scale=0.01, size=g.vertices.shape) + 0.02
        gens.append(g)
    ref_pts = [surface_points(m, 4000, seed=i) for i, m in enumerate(refs.values())]
    m = chamfer_matrix([surface_points(g, 4000, seed=10 + i) for i, g in enumerate(gens)], ref_pts)
    r = retrieval(m)
    assert r["top1"] == 1.0 and r["nearest"] == [0, 1, 2] and r["rank"] == [0, 0, 0]
    assert np.diag(m).max() < 0.5 * (m + np.eye(3) * 1e9).min()  # own shape clearly closest

    # the generated shapes in another order: nothing is retrieved, nearest follows the permutation
    perm = [1, 2, 0]
    r = retrieval(m[perm])
    assert r["top1"] == 0.0 and r["nearest"] == perm and all(k >= 1 for k in r["rank"])


def test_missing_surface_and_ties_are_misses():
    assert surface_points(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64)), 100) is None
    assert surface_points(None, 100) is None
    m = np.array([[0.1, 0.3, 0.4], [np.inf, np.inf, np.inf], [0.2, 0.5, 0.2]])
    r = retrieval(m)
    assert r["nearest"] == [0, -1, 0] and r["rank"] == [0, 3, 1]  # row 2 ties its own column with column 0
    assert r["top1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="square"):
        retrieval(np.zeros((2, 3)))
