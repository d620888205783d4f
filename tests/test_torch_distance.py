"""The PyTorch distance backend (no open3d) against Embree (open3d) and a float64 brute force."""
import numpy as np
import pytest
import torch

from d3ds2.geometry.corpus import procedural_shape
from d3ds2.geometry.normalize import normalise_mesh
from d3ds2.geometry.sparse_sdf import compute_sparse_sdf, surface_distance
from d3ds2.geometry.torch_distance import TorchSurfaceDistance


def _mesh(seed):
    mesh, _ = normalise_mesh(procedural_shape(seed), 0.95)
    return mesh


def _brute_force_distance(points, tri):
    """float64 point-triangle distance by projecting onto the plane and clamping to the edges."""
    best = np.full(len(points), np.inf)
    for a, b, c in tri.astype(np.float64):
        n = np.cross(b - a, c - a)
        n /= np.linalg.norm(n)
        foot = points - ((points - a) @ n)[:, None] * n
        inside = np.ones(len(points), bool)
        for u, v in ((a, b), (b, c), (c, a)):
            inside &= (np.cross(v - u, foot - u) @ n) >= 0
        d = np.where(inside, np.abs((points - a) @ n), np.inf)
        for u, v in ((a, b), (b, c), (c, a)):
            t = np.clip((points - u) @ (v - u) / ((v - u) @ (v - u)), 0, 1)
            d = np.minimum(d, np.linalg.norm(points - (u + t[:, None] * (v - u)), axis=1))
        best = np.minimum(best, d)
    return best


def test_unsigned_matches_float64_brute_force():
    mesh = _mesh(11)
    rng = np.random.default_rng(0)
    # near the surface (the first culling round), and far away (later rounds with growing reach)
    near = mesh.sample(300, seed=1) + rng.normal(0, 0.02, (300, 3))
    far = rng.uniform(-1.5, 1.5, (200, 3))
    pts = np.concatenate([near, far]).astype(np.float32)
    got = TorchSurfaceDistance(mesh.vertices, mesh.faces, device="cpu", chunk=64).unsigned(pts)
    want = _brute_force_distance(pts.astype(np.float64), mesh.vertices[mesh.faces])
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_inside_matches_winding_number():
    mesh = _mesh(12)
    pts = np.random.default_rng(1).uniform(-1, 1, (3000, 3)).astype(np.float32)
    got = TorchSurfaceDistance(mesh.vertices, mesh.faces, device="cpu").inside(pts)
    want = mesh.contains(pts)  # trimesh: ray tests on its own BVH
    far_from_surface = TorchSurfaceDistance(mesh.vertices, mesh.faces, device="cpu").unsigned(pts) > 1e-3
    assert 0.05 < want.mean() < 0.95
    assert (got[far_from_surface] == want[far_from_surface]).all()


def test_sparse_sdf_same_as_open3d_backend():
    pytest.importorskip("open3d")
    mesh = _mesh(7)
    ref = compute_sparse_sdf(mesh.vertices, mesh.faces, 24, query=surface_distance(mesh.vertices, mesh.faces,
                                                                                    backend="open3d"))
    got = compute_sparse_sdf(mesh.vertices, mesh.faces, 24, query=surface_distance(mesh.vertices, mesh.faces,
                                                                                    backend="torch", device="cpu"))
    np.testing.assert_array_equal(got.cells, ref.cells)
    np.testing.assert_allclose(got.sdf, ref.sdf, atol=1e-3)


def test_unknown_backend_is_named():
    mesh = _mesh(3)
    with pytest.raises(ValueError, match="sdf backend 'embree'"):
        surface_distance(mesh.vertices, mesh.faces, backend="embree")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mesh = _mesh(5)
    pts = np.random.default_rng(2).uniform(-1, 1, (20000, 3)).astype(np.float32)
    cpu = TorchSurfaceDistance(mesh.vertices, mesh.faces, device="cpu")
    gpu = TorchSurfaceDistance(mesh.vertices, mesh.faces, device="cuda")
    np.testing.assert_allclose(gpu.unsigned(pts), cpu.unsigned(pts), atol=1e-5)
    far = cpu.unsigned(pts) > 1e-3
    assert (gpu.inside(pts)[far] == cpu.inside(pts)[far]).all()


def test_metrics_same_with_torch_backend(monkeypatch):
    """mesh_metrics without open3d (the GPU machine) gives open3d's figures."""
    pytest.importorskip("open3d")
    import sys

    from d3ds2.geometry.metrics import mesh_metrics

    a, b = _mesh(3), _mesh(4)
    ref = mesh_metrics(a, b, 2000)
    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d now raises ImportError
    got = mesh_metrics(a, b, 2000)
    for k in ref:  # normals: a closest point on an edge or vertex may take either adjacent face's normal
        tol = dict(abs=0.02) if k == "normal_consistency" else dict(rel=1e-4, abs=1e-6)
        assert got[k] == pytest.approx(ref[k], **tol), k
