"""The validation script against official embeddings, on reference files made in the test: equal embeddings pass,
perturbed ones fail, a malformed file is a clear error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from d3ds2.eval.alignment.validate import validate_embeddings, write_reference
from d3ds2.eval.protocols import get_protocol
from test_eval_protocols import tiny_ulip1


def reference_inputs() -> tuple[np.ndarray, np.ndarray]:
    proto = get_protocol("d3ds2")
    shapes = [trimesh.creation.box((1, 2, 3)), trimesh.creation.icosphere(2), trimesh.creation.cone(0.5, 1.5)]
    points = np.stack([proto.surface_points(m, 256, seed=i) for i, m in enumerate(shapes)])
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    return points, images


def test_equal_embeddings_pass_and_perturbed_fail(tmp_path):
    model = tiny_ulip1(5)
    points, images = reference_inputs()
    with torch.no_grad():
        p_emb = model.encode_points(torch.from_numpy(points)).numpy() * 3.0  # official embeddings need not be unit
        i_emb = model.image_tower(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    good = write_reference(tmp_path / "good.npz", points, p_emb, images, i_emb)
    report = validate_embeddings(model, good)
    assert report["passed"] and report["points"]["min"] > 0.99999 and report["images"]["min"] > 0.99999
    noisy = p_emb.copy()
    rng = np.random.default_rng(1)
    noisy[1] += 0.1 * np.linalg.norm(noisy[1]) / np.sqrt(noisy.shape[1]) * rng.standard_normal(noisy.shape[1])
    report = validate_embeddings(model, write_reference(tmp_path / "noisy.npz", points, noisy, images, i_emb))
    assert not report["passed"] and report["points"]["worst"] == 1 and 0.9 < report["points"]["min"] < 0.999
    assert report["images"]["min"] > 0.99999  # the image side still matches
    bad_images = i_emb.copy()
    bad_images[2] = -bad_images[2]
    report = validate_embeddings(model, write_reference(tmp_path / "img.npz", points, p_emb, images, bad_images))
    assert not report["passed"] and report["images"]["worst"] == 2


def test_malformed_reference_is_a_clear_error(tmp_path):
    model = tiny_ulip1()
    points, _ = reference_inputs()
    np.savez(tmp_path / "no_emb.npz", points=points)
    with pytest.raises(KeyError, match="point_embeddings"):
        validate_embeddings(model, tmp_path / "no_emb.npz")
    write_reference(tmp_path / "wrong_dim.npz", points, np.ones((3, 7), np.float32))
    with pytest.raises(ValueError, match="same model"):
        validate_embeddings(model, tmp_path / "wrong_dim.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        validate_embeddings(model, tmp_path / "missing.npz")
