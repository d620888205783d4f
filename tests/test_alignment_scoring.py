"""The alignment scoring loop of evaluate.py on real files: meshes + images matched by stem, a tiny random ULIP-2
model, broken inputs reported per row; the model registry's errors."""
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from d3ds2.eval import summarise
from d3ds2.eval.alignment import alignment_scores, coloured_surface_points, load_alignment_model, match_images
from d3ds2.eval.alignment.image_tower import ClipImageTower
from d3ds2.eval.alignment.ulip2 import ULIP2_TINY, ULIP2Alignment

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8, projection_dim=ULIP2_TINY["embed_dim"])


def test_scores_match_the_model_and_broken_inputs_are_reported(tmp_path):
    torch.manual_seed(0)
    model = ULIP2Alignment(ClipImageTower(config=TOWER), config=ULIP2_TINY)
    meshes, images = tmp_path / "meshes", tmp_path / "images"
    meshes.mkdir()
    images.mkdir()
    shapes = {"box": trimesh.creation.box(), "ball": trimesh.creation.icosphere(2), "cone": trimesh.creation.cone(1, 2)}
    rng = np.random.default_rng(0)
    for name, mesh in shapes.items():
        mesh.export(meshes / f"{name}.obj")
        Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8)).save(images / f"{name}.png")
    (meshes / "broken.obj").write_text("not a mesh\n")
    (images / "broken.png").write_bytes(b"\x89PNG")
    (meshes / "lonely.obj").write_text("v 0 0 0\n")
    stems = sorted(p.stem for p in meshes.iterdir())
    found = match_images(stems, images)
    assert sorted(found) == ["ball", "box", "broken", "cone"]
    pairs = [(meshes / f"{s}.obj", found[s]) for s in sorted(found)]
    rows = alignment_scores(model, pairs, batch_size=2, seed=3, progress=False)
    by_name = dict(zip(sorted(found), rows))
    assert "ulip2_error" in by_name["broken"] and "ulip2" not in by_name["broken"]
    for name in shapes:
        points = torch.from_numpy(coloured_surface_points(shapes[name], model.n_points, seed=3))[None]
        expect = model.score(points, [images / f"{name}.png"]).item()
        assert by_name[name]["ulip2"] == pytest.approx(expect, abs=1e-5)
        assert -1.0 <= by_name[name]["ulip2"] <= 1.0
    summary = summarise([{"name": n, **r} for n, r in by_name.items()])
    assert summary["evaluated"] == 3 and summary["failed"] == 1
    assert summary["ulip2/mean"] == pytest.approx(np.mean([by_name[n]["ulip2"] for n in shapes]))


def test_registry_errors_name_the_fix(tmp_path):
    with pytest.raises(KeyError, match="choose from"):
        load_alignment_model("pointclip", ckpt="x.pt")
    with pytest.raises(ValueError, match="alignment.ulip2.ckpt is not set"):
        load_alignment_model("ulip2", ckpt=None)
    with pytest.raises(ValueError, match="EVA02-E-14-plus"):
        load_alignment_model("uni3d", ckpt=str(tmp_path / "model.pt"))
    with pytest.raises(FileNotFoundError, match="OpenShape/openshape-pointbert-vitg14-rgb"):
        load_alignment_model("openshape", ckpt=str(tmp_path / "missing.pt"), image_tower="unused")
