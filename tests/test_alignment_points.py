"""Shared point-cloud pieces of the alignment encoders against brute-force float64 references."""
import numpy as np
import torch
import trimesh

from d3ds2.eval.alignment.points import (coloured_surface_points, farthest_point_sample, knn, knn_patches,
                                         normalise_unit_sphere)


def _fps_reference(xyz: np.ndarray, m: int) -> list[int]:
    chosen, dist = [0], np.full(len(xyz), np.inf)
    for _ in range(m - 1):
        dist = np.minimum(dist, ((xyz - xyz[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(dist.argmax()))
    return chosen


def test_farthest_point_sample_matches_the_greedy_reference(gen):
    xyz = torch.rand(3, 200, 3, generator=gen, dtype=torch.float64)
    idx = farthest_point_sample(xyz, 17)
    for b in range(3):
        assert idx[b].tolist() == _fps_reference(xyz[b].numpy(), 17)
    assert len(set(idx[0].tolist())) == 17


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
