"""Shared point-cloud pieces of the alignment encoders against brute-force float64 references."""
import numpy as np
import torch
import trimesh

from d3ds2.eval.alignment.points import (POINTNET2_SKIP_SQ_NORM, coloured_surface_points, farthest_point_sample,
                                         knn, knn_patches, normalise_unit_sphere)


def _fps_reference(xyz: np.ndarray, m: int, skip: float = -1.0) -> list[int]:
    eligible = (xyz ** 2).sum(1) > skip
    chosen, dist = [0], np.full(len(xyz), np.inf)
    for _ in range(m - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(np.where(eligible, dist, -1.0).argmax()))
    return chosen


def test_farthest_point_sample_matches_the_greedy_reference(gen):
    xyz = torch.rand(3, 200, 3, generator=gen, dtype=torch.float64)
    idx = farthest_point_sample(xyz, 17)
    for b in range(3):
        assert idx[b].tolist() == _fps_reference(xyz[b].numpy(), 17)
    assert len(set(idx[0].tolist())) == 17


def test_farthest_point_sample_with_the_pointnet2_origin_skip(gen):
    xyz = torch.nn.functional.normalize(torch.randn(3, 300, 3, generator=gen, dtype=torch.float64), dim=-1)
    xyz[:, 5:40] *= 0.01  # squared norm <= 1e-3: the pointnet2 kernel never picks them
    idx = farthest_point_sample(xyz, 60, POINTNET2_SKIP_SQ_NORM)
    for b in range(3):
        assert idx[b].tolist() == _fps_reference(xyz[b].numpy(), 60, POINTNET2_SKIP_SQ_NORM)
        assert not set(idx[b, 1:].tolist()) & set(range(5, 40))
    plain = farthest_point_sample(xyz, 60)  # without the skip the cluster at the origin is far from the sphere
    assert set(plain[0, 1:].tolist()) & set(range(5, 40))
    near = torch.zeros(1, 10, 3, dtype=torch.float64)  # no eligible point: index 0 throughout, as the kernel
    assert farthest_point_sample(near, 4, POINTNET2_SKIP_SQ_NORM).tolist() == [[0, 0, 0, 0]]
    xyz[:, 5:40] *= 100  # nothing near the origin: the skip changes nothing
    assert torch.equal(farthest_point_sample(xyz, 60, POINTNET2_SKIP_SQ_NORM), farthest_point_sample(xyz, 60))


def test_knn_and_patches_against_a_sort(gen):
    points = torch.rand(2, 300, 6, generator=gen, dtype=torch.float64)
    patches, centers = knn_patches(points, n_patches=8, patch_size=5)
    assert patches.shape == (2, 8, 5, 6) and centers.shape == (2, 8, 3)
    for b in range(2):
        d = ((points[b, None, :, :3] - centers[b, :, None]) ** 2).sum(-1)
        order = d.argsort(1)[:, :5]
        expect = points[b][order]
        torch.testing.assert_close(patches[b, ..., :3], expect[..., :3] - centers[b, :, None])
        torch.testing.assert_close(patches[b, ..., 3:], expect[..., 3:])  # colours are not centred
    assert torch.equal(knn(centers, points[..., :3], 1)[..., 0], farthest_point_sample(points[..., :3], 8))


def test_normalise_unit_sphere(gen):
    xyz = torch.randn(2, 100, 3, generator=gen, dtype=torch.float64) * 7 + 3
    out = normalise_unit_sphere(xyz)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(out.norm(dim=-1).amax(1), torch.ones(2, dtype=torch.float64))


def test_coloured_surface_points_take_vertex_and_face_colours():
    box = trimesh.creation.box()
    plain = coloured_surface_points(box, 500, seed=1)
    assert plain.shape == (500, 6) and plain.dtype == np.float32
    assert np.allclose(plain[:, 3:], 0.4) and np.abs(plain[:, :3]).max() <= 0.5 + 1e-6
    red = box.copy()
    red.visual = trimesh.visual.ColorVisuals(red, vertex_colors=np.tile([255, 0, 0, 255], (len(red.vertices), 1)))
    assert np.allclose(coloured_surface_points(red, 100)[:, 3:], [1, 0, 0])
    faces = box.copy()
    faces.visual = trimesh.visual.ColorVisuals(faces, face_colors=np.tile([0, 0, 255, 255], (len(box.faces), 1)))
    assert np.allclose(coloured_surface_points(faces, 100)[:, 3:], [0, 0, 1])
