"""Generalized winding numbers (libigl) against a float64 solid-angle sum; the winding path of the watertight step."""
import numpy as np
import pytest
import trimesh

from d3ds2.geometry.sparse_sdf import compute_sparse_sdf, voxel_centres
from d3ds2.geometry.watertight import choose_path, make_watertight, reference_surface
from d3ds2.geometry.winding import WindingNumber


def brute_winding(vertices, faces, points, chunk=2048):
    """float64 sum over triangles of the signed solid angle (Van Oosterom & Strackee 1983) / 4 pi."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces)]  # [F, 3, 3]
    out = []
    for start in range(0, len(points), chunk):
        p = np.asarray(points[start:start + chunk], np.float64)[:, None, None, :]
        a, b, c = np.moveaxis(tri[None] - p, 2, 0)  # each [P, F, 3]
        la, lb, lc = (np.linalg.norm(v, axis=-1) for v in (a, b, c))
        det = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
        den = la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", b, c) * la \
            + np.einsum("pfi,pfi->pf", c, a) * lb
        out.append(2.0 * np.arctan2(det, den).sum(axis=1) / (4 * np.pi))
    return np.concatenate(out)


def _cut(mesh, keep):
    """The faces of `mesh` whose centroid satisfies keep(centroid [F, 3]) -> bool [F]."""
    out = trimesh.Trimesh(mesh.vertices, mesh.faces[keep(mesh.triangles_center)], process=False)
    out.remove_unreferenced_vertices()
    return out


def _random_points(rng, n, scale=1.0):
    return rng.uniform(-scale, scale, (n, 3))


def test_matches_float64_solid_angle_sum():
    rng = np.random.default_rng(0)
    sphere = trimesh.creation.icosphere(3, 0.7)
    meshes = {
        "closed sphere": sphere,
        "cut sphere": _cut(sphere, lambda c: c[:, 2] < 0.3),
        "holed box": _cut(trimesh.creation.box((1, 1, 1)).subdivide().subdivide(),
                          lambda c: np.linalg.norm(c[:, :2], axis=1) > 0.2),
        "soup": trimesh.Trimesh(rng.normal(0, 0.5, (90, 3)), np.arange(90).reshape(-1, 3), process=False),
    }
    for name, mesh in meshes.items():
        pts = _random_points(rng, 3000)
        w, ref = WindingNumber(mesh.vertices, mesh.faces)(pts), brute_winding(mesh.vertices, mesh.faces, pts)
        err = np.abs(w - ref)
        assert err.max() < 0.15 and err[np.abs(ref - 0.5) < 0.1].max(initial=0) < 0.01, name  # exact near 0.5
        assert ((w > 0.5) == (ref > 0.5))[np.abs(ref - 0.5) > 0.01].all(), name


def test_closed_cube_open_cube_and_single_triangle():
    cube = trimesh.creation.box((1, 1, 1))
    w = WindingNumber(cube.vertices, cube.faces)
    inside = _random_points(np.random.default_rng(1), 500, 0.45)
    outside = np.array([[0.8, 0, 0], [0, -2, 0.3], [3, 3, 3]])
    assert np.allclose(w(inside, np.inf), 1.0, atol=5e-3) and np.allclose(w(outside, np.inf), 0.0, atol=5e-3)
    assert (w(inside) > 0.85).all() and (w(outside) < 0.15).all()  # the fast pass away from 0.5
    top = cube.face_normals[:, 2] > 0.5
    assert top.sum() == 2
    opened = trimesh.Trimesh(cube.vertices, cube.faces[~top], process=False)
    w_open = WindingNumber(opened.vertices, opened.faces)([[0, 0, 0]], np.inf)[0]
    assert w_open > 0.5 and w_open == pytest.approx(5 / 6, abs=1e-3)  # five faces of six, seen from the centre
    tri = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)  # normal +z
    on_plane = np.array([[0.2, 0.2, 0], [0.5, 0.1, 0], [0.1, 0.6, 0]])
    wt = WindingNumber(tri.vertices, tri.faces)
    behind, front = wt(on_plane - [0, 0, 1e-6]), wt(on_plane + [0, 0, 1e-6])
    assert np.allclose(behind, 0.5, atol=5e-3) and np.allclose(front, -0.5, atol=0.15)  # a jump of 1 across it
    assert np.allclose(wt([[2.0, 2.0, 0.0], [-1, 0.3, 0]], np.inf), 0.0, atol=1e-6)  # its plane outside it


def test_paths_closed_winding_and_sheet():
    sphere = trimesh.creation.icosphere(3, 0.7)
    assert choose_path(sphere).path == "closed"
    cut = choose_path(_cut(sphere, lambda c: c[:, 2] < 0.3))
    assert cut.path == "winding" and cut.decisive > 0.9, cut.stats()
    plane = trimesh.creation.box((1.6, 1.6, 1e-3))
    sheet = _cut(plane, lambda c: c[:, 2] > 0)  # the top face alone: an open sheet
    made = choose_path(sheet)
    assert made.path == "rebuild" and 0.3 < made.decisive < 0.7, made.stats()
    assert "open sheet" in made.stats()["reason"]
    inside_out = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1])  # closed but inverted: not a closed solid
    made = choose_path(inside_out)
    assert made.path == "winding" and "flipped" in made.reason
    assert made.winding([[0, 0, 0]])[0] > 0.5 and made.surface.volume > 0


def test_cut_sphere_sdf_has_the_sign_of_its_solid():
    """A sphere cut by the plane z = c: the winding number is exactly 0.5 on the disk spanning the cut (the
    removed cap subtends half the sphere from there), so the solid is the truncated ball |p| < r, z < c."""
    r, c, R = 0.7, 0.3, 64
    mesh = _cut(trimesh.creation.icosphere(5, r), lambda x: x[:, 2] < c)
    solid = make_watertight(mesh, "auto", R)
    assert solid.path == "winding"
    sdf = compute_sparse_sdf(mesh.vertices, mesh.faces, R, query=solid.query())
    coords, values = sdf.voxels()
    p = voxel_centres(coords, R).astype(np.float64)
    analytic = np.maximum(np.linalg.norm(p, axis=1) - r, p[:, 2] - c) / (2.0 / R)  # voxels; exact in sign
    clear = np.abs(analytic) > 0.1  # icosphere facets lie within 0.01 voxel of the sphere at R = 64
    assert clear.sum() > 20000 and (np.sign(values[clear]) == np.sign(analytic[clear])).all()
    # the voxels over the cut are inside below the disk and outside above it
    disk = (np.linalg.norm(p[:, :2], axis=1) < 0.5) & (np.abs(p[:, 2] - c) > 0.1) & (np.abs(p[:, 2] - c) < 0.25)
    assert disk.sum() > 100 and (np.sign(values[disk]) == np.sign(p[disk, 2] - c)).all()
    ref = reference_surface(mesh, R)
    cap_area = np.pi * (r**2 - c**2)
    truncated = np.pi * (2 * r**3 / 3 + r**2 * c - c**3 / 3)  # volume of the ball below z = c
    assert ref.area == pytest.approx(mesh.area + cap_area, rel=0.03)  # the hole is capped
    assert abs(ref.volume) == pytest.approx(truncated, rel=0.03)


def test_wide_hole_is_capped_across_its_middle():
    """A sphere cut by a plane, the hole 40 voxels wide at 64^3 (5 times the stored band on both sides): the cap
    is stored across its middle, so the zero level set is one closed surface, the truncated ball."""
    r, c, R = 0.7, 0.3, 64
    mesh = _cut(trimesh.creation.icosphere(5, r), lambda x: x[:, 2] < c)
    solid = make_watertight(mesh, "auto", R)
    assert solid.path == "winding" and solid.stats()["cap_faces"] > 100
    cap_area = np.pi * (r**2 - c**2)
    assert solid.cap.area == pytest.approx(cap_area, rel=0.1)  # ends within a voxel of the rim
    sdf = compute_sparse_sdf(mesh.vertices, mesh.faces, R, query=solid.query())
    coords, values = sdf.voxels()
    p = voxel_centres(coords, R).astype(np.float64)
    middle = (np.linalg.norm(p[:, :2], axis=1) < 0.4) & (np.abs(p[:, 2] - c) < 3.5 * 2.0 / R)
    assert middle.sum() > 1000  # stored: without the cap only cells within the band of the input are
    to_plane = (p[middle, 2] - c) / (2.0 / R)  # voxels, positive above the cut (outside)
    assert np.abs(values[middle] - to_plane).max() < 1.0
    assert (np.sign(values[middle]) == np.sign(to_plane)).all()
    ref = reference_surface(mesh, R)
    assert ref.is_watertight and ref.body_count == 1
    truncated = np.pi * (2 * r**3 / 3 + r**2 * c - c**3 / 3)  # volume of the ball below z = c
    assert ref.volume == pytest.approx(truncated, rel=0.03)
    assert ref.area == pytest.approx(mesh.area + cap_area, rel=0.03)


def test_block_signs_match_brute_force_on_open_meshes():
    """Every stored voxel of holed meshes has the sign of the float64 winding number (block signs included)."""
    rng = np.random.default_rng(2)
    sphere = trimesh.creation.icosphere(2, 0.8)
    holes = rng.normal(size=(3, 3))
    holes /= np.linalg.norm(holes, axis=1, keepdims=True)
    holed = _cut(sphere, lambda x: (x / 0.8 @ holes.T).max(axis=1) < np.cos(np.radians([10, 25, 40]))[None].max())
    box = _cut(trimesh.creation.box((1.2, 0.8, 0.9)).subdivide(), lambda x: x[:, 0] < 0.3)
    for mesh in (holed, box):
        solid = make_watertight(mesh, "winding", 40)
        coords, values = compute_sparse_sdf(mesh.vertices, mesh.faces, 40, query=solid.query()).voxels()
        ref = brute_winding(mesh.vertices, mesh.faces, voxel_centres(coords, 40))
        clear = np.abs(ref - 0.5) > 0.01
        assert clear.mean() > 0.99
        assert ((values < 0) == (ref > 0.5))[clear].all()
