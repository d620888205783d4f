"""Sparse SDF vs analytic SDFs and mesh2sdf; resampling; sparse marching cubes; metrics."""
import functools

import numpy as np
import pytest
import trimesh

from d3ds2.geometry.marching_cubes import sparse_marching_cubes
from d3ds2.geometry.metrics import mesh_metrics
from d3ds2.geometry.sparse_sdf import resample_sparse_sdf, sparse_sdf_of_mesh, voxel_centres


def _sphere(p, r=0.7):
    return np.linalg.norm(p, axis=1) - r


def _box(p, half=(0.6, 0.45, 0.3)):
    q = np.abs(p) - np.asarray(half)
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


def _torus(p, R=0.55, r=0.2):  # axis z
    return np.linalg.norm(np.stack([np.linalg.norm(p[:, :2], axis=1) - R, p[:, 2]], 1), axis=1) - r


def _union(p):
    return np.minimum(_box(p - np.array([0.25, 0, 0]), (0.4, 0.4, 0.4)), _sphere(p + np.array([0.3, 0, 0]), 0.45))


def _union_mesh():
    import manifold3d as mf

    m = (mf.Manifold.cube((0.8, 0.8, 0.8), center=True).translate((0.25, 0, 0))
         + mf.Manifold.sphere(0.45, 256).translate((-0.3, 0, 0))).to_mesh()
    return trimesh.Trimesh(np.asarray(m.vert_properties)[:, :3], np.asarray(m.tri_verts))


@functools.lru_cache(maxsize=None)
def _shape(name):
    """(mesh, analytic SDF) built once per test process."""
    return {
        "sphere": lambda: (trimesh.creation.icosphere(5, 0.7), _sphere),
        "box": lambda: (trimesh.creation.box((1.2, 0.9, 0.6)), _box),
        "torus": lambda: (trimesh.creation.torus(0.55, 0.2, 256, 128), _torus),
        "union": lambda: (_union_mesh(), _union),
    }[name]()


# every shape at 128; the union (flat faces, sharp edges, a sphere) also at 256
@pytest.mark.parametrize("name,R", [("sphere", 128), ("box", 128), ("torus", 128), ("union", 128), ("union", 256)])
def test_sparse_sdf_matches_analytic(name, R):
    mesh, fn = _shape(name)
    s = sparse_sdf_of_mesh(mesh, R, band=4.0, trunc=6.0)
    coords, values = s.voxels()
    ref = fn(voxel_centres(coords, R).astype(np.float64)) / (2.0 / R)
    band = np.abs(ref) < 4.0
    assert band.sum() > 1000
    if name == "union":  # min() of two SDFs is exact outside only; inside it bounds |sdf| from above
        band &= ref > 0
    assert np.abs(values[band] - ref[band]).max() <= 0.5  # tessellation error included
    clear = np.abs(ref) > 0.5
    assert (np.sign(values[clear]) == np.sign(ref[clear])).all()
    if R > 128:
        return
    # every voxel within the band is stored: the stored band count matches the analytic one over all cells
    shell = np.abs(fn(voxel_centres(np.argwhere(np.ones((R,) * 3, bool)), R).astype(np.float64)) / (2.0 / R)) < 3.5
    assert (np.abs(values) < 3.5).sum() == pytest.approx(shell.sum(), rel=0.01)
    # no dense allocation: cells are a thin shell
    assert len(s.cells) < 0.25 * (R // 8) ** 3


def test_sparse_sdf_matches_mesh2sdf():
    mesh2sdf = pytest.importorskip("mesh2sdf")
    from d3ds2.geometry.corpus import real_mesh_paths
    from d3ds2.geometry.normalize import normalise_mesh

    mesh, _ = normalise_mesh(trimesh.load(real_mesh_paths()["pyvista_sphere"]))
    R = 64
    s = sparse_sdf_of_mesh(mesh, R)
    coords, values = s.voxels()
    # mesh2sdf samples at -1 + i * 2/R (voxel corners): shift the mesh by half a voxel to get our centres
    shifted = np.asarray(mesh.vertices) - 1.0 / R
    dense = mesh2sdf.compute(shifted, np.asarray(mesh.faces), R, fix=False) / (2.0 / R)
    ref = dense[coords[:, 0], coords[:, 1], coords[:, 2]]
    band = np.abs(ref) < 3
    assert np.abs(values[band] - ref[band]).max() < 0.05


def test_resample_matches_analytic():
    mesh = _shape("sphere")[0]
    src = sparse_sdf_of_mesh(mesh, 256)
    for R in (192,):
        dst = resample_sparse_sdf(src, R)
        coords, values = dst.voxels()
        ref = _sphere(voxel_centres(coords, R).astype(np.float64)) / (2.0 / R)
        band = np.abs(ref) < dst.band
        assert band.sum() > 1000 and np.abs(values[band] - ref[band]).max() < 0.1
        # the band cells are all there: the resampled set covers a direct computation's cells
        direct = sparse_sdf_of_mesh(mesh, R, band=dst.band)
        assert {tuple(c) for c in direct.cells} <= {tuple(c) for c in dst.cells}


def test_sparse_marching_cubes_closed_and_accurate():
    mesh = trimesh.creation.torus(0.55, 0.2, 128, 64)
    s = sparse_sdf_of_mesh(mesh, 128)
    coords, values = s.voxels()
    out = sparse_marching_cubes(coords, values, 128)
    assert out.is_watertight and len(out.split()) == 1  # no inner shell
    assert out.volume == pytest.approx(mesh.volume, rel=0.02)  # interior inside, normals outward
    m = mesh_metrics(out, mesh, 20000, thresholds=(0.02,))
    assert m["chamfer_l1"] < 0.01 and m["fscore@0.02"] > 0.95 and m["normal_consistency"] > 0.97


def test_metrics_detect_differences():
    a = trimesh.creation.icosphere(4, 0.5)
    same = mesh_metrics(a, a, 10000)
    shifted = mesh_metrics(a, a.copy().apply_translation((0.05, 0, 0)), 10000)
    assert same["chamfer_l1"] < shifted["chamfer_l1"] and same["fscore@0.01"] > shifted["fscore@0.01"]


def test_row_inverse_matches_numpy_unique():
    from d3ds2.geometry.marching_cubes import _row_inverse

    rng = np.random.default_rng(5)
    for n in (1, 2, 50, 5000):
        rows = rng.integers(-3, 4, (n, 3))
        assert np.array_equal(_row_inverse(rows), np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1))
