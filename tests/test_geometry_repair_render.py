"""Watertight repair, sharp edges, renders and cameras."""
import numpy as np
import pytest
import trimesh

from d3ds2.geometry.corpus import procedural_shape, real_mesh_paths
from d3ds2.geometry.normalize import BadMeshError, clean_mesh, normalise_mesh
from d3ds2.geometry.render import Renderer, project, sample_cameras
from d3ds2.geometry.sharp_edges import sharp_edges
from d3ds2.geometry.sparse_sdf import SurfaceDistance, compute_sparse_sdf
from d3ds2.geometry.watertight import (exact_solid, is_closed_solid, make_watertight, rebuild_watertight,
                                      reference_surface)


@pytest.fixture(scope="module")
def bunny():
    mesh, _ = normalise_mesh(clean_mesh(trimesh.load(real_mesh_paths()["bunny_scan"])))
    assert not mesh.is_watertight  # the scan is open
    return mesh


def test_watertight_open_scan_and_soup(bunny):
    out = rebuild_watertight(bunny, 96)
    assert is_closed_solid(out)
    # every output vertex lies about `offset` voxels from the input surface
    d = SurfaceDistance(bunny.vertices, bunny.faces).unsigned(out.vertices)
    assert d.max() < 2 * (2 / 96)
    soup_v = np.asarray(bunny.vertices)[np.asarray(bunny.faces)[::3]].reshape(-1, 3)
    soup = trimesh.Trimesh(soup_v, np.arange(len(soup_v)).reshape(-1, 3), process=False)
    assert is_closed_solid(rebuild_watertight(soup, 96))


def test_watertight_drops_inner_shell():
    outer, inner = trimesh.creation.box((1.6, 1.6, 1.6)), trimesh.creation.box((0.6, 0.6, 0.6))
    out = rebuild_watertight(trimesh.util.concatenate([outer, inner]), 64)
    assert len(out.split()) == 1 and out.volume == pytest.approx(1.6**3, rel=0.1)


def _box(size, centre=(0, 0, 0)):
    return trimesh.creation.box(size, trimesh.transformations.translation_matrix(centre))


def test_exact_solid_of_interpenetrating_bodies():
    """Two overlapping boxes in one mesh (convex-decomposition style): watertight edge-wise, but the parts of
    each box inside the other are not surface. The exact solid is their union; its SDF is negative in the
    overlap, where the raw mesh's ray parity says outside."""
    a, b = _box((1.0, 0.6, 0.6), (-0.2, 0, 0)), _box((1.0, 0.6, 0.6), (0.2, 0, 0))
    mesh = trimesh.util.concatenate([a, b])
    assert is_closed_solid(mesh) and len(mesh.split(only_watertight=False)) == 2
    made = make_watertight(mesh, "auto", 64)
    solid = made.surface
    assert made.path == "closed" and len(solid.split(only_watertight=False)) == 1
    assert solid.volume == pytest.approx(1.4 * 0.6 * 0.6, rel=1e-6)  # union, not the sum 2 * 0.36
    centroids = solid.triangles_center
    inside_both = (np.abs(centroids[:, 0]) < 0.299) & (np.abs(centroids[:, 1:]) < 0.299).all(1)
    assert not inside_both.any()  # no face of the union lies inside the overlap
    R = 32
    wrong = []
    for verts, faces in ((solid.vertices, solid.faces), (mesh.vertices, mesh.faces)):
        coords, sdf = compute_sparse_sdf(np.asarray(verts), np.asarray(faces), R).voxels()
        p = -1 + (coords + 0.5) * 2 / R
        overlap = (np.abs(p) < 0.25).all(1)  # voxel centres inside both boxes
        assert overlap.sum() > 100
        wrong.append(int((sdf[overlap] >= 0).sum()))
    # the union: every overlap voxel inside; the raw mesh: its inner faces give some of them the outside sign
    assert wrong[0] == 0 and wrong[1] > 0, wrong


def test_exact_solid_cavity_single_body_and_open_mesh(bunny):
    outer, cavity = _box((1.6, 1.6, 1.6)), _box((0.6, 0.6, 0.6))
    cavity.invert()  # an inward-facing inner shell: a hollow box
    solid = exact_solid(trimesh.util.concatenate([outer, cavity]))
    assert solid.volume == pytest.approx(1.6**3 - 0.6**3, rel=1e-6)
    assert not solid.contains([[0.0, 0.0, 0.0]])[0] and solid.contains([[0.7, 0.7, 0.7]])[0]
    single = _box((1, 1, 1))
    assert exact_solid(single) is single
    assert exact_solid(bunny) is None  # open scan: not made of closed bodies
    hollow = trimesh.util.concatenate([outer, cavity])
    assert reference_surface(hollow).volume == pytest.approx(solid.volume)


def test_sharp_edges_cube_and_sphere():
    assert len(sharp_edges(trimesh.creation.box((1, 1, 1)))) == 12
    assert len(sharp_edges(trimesh.creation.icosphere(4, 0.8))) == 0
    assert len(sharp_edges(procedural_shape(3))) > 12


def test_bad_meshes_raise():
    with pytest.raises(BadMeshError):
        clean_mesh(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)))
    with pytest.raises(BadMeshError):
        clean_mesh(trimesh.Trimesh([[np.nan, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False))
    with pytest.raises(BadMeshError):
        clean_mesh(trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [2, 0, 0]], [[0, 1, 2]], process=False))


def test_normalise_frame(bunny):
    lo, hi = bunny.bounds
    assert np.allclose((lo + hi) / 2, 0, atol=1e-9) and np.isclose((hi - lo).max(), 1.9)


def test_render_mask_matches_projection():
    mesh, _ = normalise_mesh(procedural_shape(1))
    rng = np.random.default_rng(0)
    radius = float(np.linalg.norm(mesh.vertices, axis=1).max())
    renderer = Renderer(mesh)
    for cam in sample_cameras(4, rng, radius, size=128):
        rgba = renderer.render(cam)
        alpha = rgba[..., 3] > 0
        assert 0.05 < alpha.mean() < 0.95
        assert (rgba[~alpha][:, :3] == 255).all()  # white background
        uv = project(mesh.vertices, cam)
        assert (uv > 0).all() and (uv < 128).all()  # the object is in frame
        col = np.clip(np.floor(uv).astype(int), 0, 127)
        near = np.zeros_like(alpha)
        for dy in (-1, 0, 1):  # vertices on the silhouette may fall on the pixel next to the mask
            for dx in (-1, 0, 1):
                near |= np.roll(np.roll(alpha, dy, 0), dx, 1)
        assert near[col[:, 1], col[:, 0]].all()
        # ray through a masked pixel centre hits the mesh at a point that projects back to that pixel
        r, c = np.argwhere(alpha)[len(np.argwhere(alpha)) // 2]
        ray = renderer.rays(cam)[r * 128 + c]
        t = renderer.scene.cast_rays(ray[None])["t_hit"].numpy()[0]
        assert np.allclose(project((ray[:3] + t * ray[3:])[None], cam)[0], (c + 0.5, r + 0.5), atol=1e-2)


def test_exact_solid_drops_stray_triangles_only():
    """A decomposition with a few loose triangles (pybullet's laikago chassis has two): the triangles are
    dropped and the bodies united; when open pieces hold a real share of the area the mesh stays open."""
    a, b = _box((1.0, 0.6, 0.6), (-0.2, 0, 0)), _box((1.0, 0.6, 0.6), (0.2, 0, 0))
    stray = trimesh.Trimesh([[0.9, 0.9, 0.9], [0.92, 0.9, 0.9], [0.9, 0.92, 0.9]], [[0, 1, 2]], process=False)
    solid = exact_solid(trimesh.util.concatenate([a, b, stray]))
    assert solid is not None and solid.volume == pytest.approx(1.4 * 0.6 * 0.6, rel=1e-6)
    sheet = trimesh.Trimesh([[-1, -1, 0.8], [1, -1, 0.8], [1, 1, 0.8], [-1, 1, 0.8]], [[0, 1, 2], [0, 2, 3]])
    assert exact_solid(trimesh.util.concatenate([a, b, sheet])) is None  # a 4-unit open sheet is not noise
