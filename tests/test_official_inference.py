"""inference.py pretrained=DIR end to end on a tiny official-layout release written in the test (random
weights, CPU), the Python API ImageTo3DPipeline.from_pretrained, and the image checks of the loader."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from d3ds2.pipeline import ImageTo3DPipeline, StageSampling

from official_layout import tiny_config, write_release

ROOT = Path(__file__).resolve().parents[1]
DINO = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=518, patch_size=14,
            num_register_tokens=4)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    root = tmp_path_factory.mktemp("official")
    write_release(root / "release", tiny_config("v1.1"), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINO)).save_pretrained(root / "dino")
    images = root / "images"
    images.mkdir()
    for i, name in enumerate(("chair", "lamp")):
        rgba = np.zeros((96, 80, 4), np.uint8)
        rgba[20:80, 15 + 10 * i:60, :3] = (200, 60 + 50 * i, 30)
        rgba[20:80, 15 + 10 * i:60, 3] = 255
        Image.fromarray(rgba).save(images / f"{name}.png")
    return root


FAST = dict(dense=StageSampling(2, 6.0, 7.0), sparse_512=StageSampling(2, 6.0, 7.0), sparse_1024=StageSampling(2, 8.0, 7.0))


def test_from_pretrained_runs_both_resolutions_with_official_settings(release):
    pipe = ImageTo3DPipeline.from_pretrained(release / "release", backbone=str(release / "dino"))
    assert pipe.mc_level == 0.2 and pipe.cells_from == "mesh" and pipe.index_threshold == 0.1
    assert pipe.refiner_512 is not None and pipe.refiner_1024 is not None
    assert pipe.weights_dtype == torch.float32  # use_fp16 in config.yaml, but on the CPU
    assert all(p.dtype == torch.float32 for p in pipe.stage_512.dit.parameters())
    meshes = pipe([release / "images" / "chair.png"], resolution=1024, **FAST)  # 512 mesh -> 1024 cells -> sign refiner
    assert len(meshes) == 1 and isinstance(meshes[0], trimesh.Trimesh)
    names = [r.name for r in pipe.reports]
    assert names == ["condition", "index DiT", "sparse DiT 512", "VAE decode 512", "refiner 512", "sparse DiT 1024",
                     "VAE decode 1024", "refiner 1024"], names
    if len(meshes[0].vertices):
        assert np.abs(meshes[0].vertices).max() <= 1.0 + 1e-6


def test_inference_cli_pretrained_names_outputs_after_inputs(release, tmp_path):
    out = tmp_path / "meshes"
    cmd = [sys.executable, "inference.py", f"pretrained={release / 'release'}", f"image={release / 'images'}", f"out={out}",
           f"backbone={release / 'dino'}", "device=cpu", "dense.steps=2", "sparse_512.steps=2", "weights_dtype=float32",
           "decode_chunk=4"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # plain torch paths on the CPU
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["chair.glb", "lamp.glb"]
    assert "refiner 512" in res.stdout


def test_images_that_cannot_condition_are_refused(tmp_path):
    from d3ds2.models.conditioner import preprocess_image

    Image.new("RGBA", (1, 1), (255, 0, 0, 255)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match="dot.png: a 1x1 image has nothing to condition on"):
        preprocess_image(tmp_path / "dot.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(ValueError, match="clear.png: the image is fully transparent"):
        preprocess_image(tmp_path / "clear.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        preprocess_image(tmp_path / "notes.png")


def test_huge_images_are_reduced_on_load(tmp_path):
    from d3ds2.models.conditioner import MAX_IMAGE_SIDE, open_image, preprocess_image

    big = np.full((8000, 8000, 3), 255, np.uint8)
    big[2000:6000, 3000:5000] = (10, 120, 200)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(big).save(tmp_path / "big.png")
    del big
    for name in ("big.jpg", "big.png"):
        im = open_image(tmp_path / name)
        assert max(im.size) <= 2 * MAX_IMAGE_SIDE, (name, im.size)
    with pytest.warns(UserWarning, match="border colour"):
        x = preprocess_image(tmp_path / "big.jpg")
    assert x.shape == (4, 518, 518) and x[3].sum() > 0


def test_memory_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's d3ds2 (a script's sys.path starts at benchmarks/)
    cmd = [sys.executable, "benchmarks/official_pipeline_memory.py", "--size", "tiny", "--device", "cpu", "--steps", "1",
           "--repeats", "1", "--warmup", "0", "--resolutions", "1024", "--out", str(tmp_path / "r.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((tmp_path / "r.json").read_text())["resolutions"]["1024"]
    assert entry["same_mesh"] and entry["low_vram"]["peak_gib"] is None
    names = [s[0] for s in entry["low_vram"]["stages"]]
    assert "refiner 512" in names and "refiner 1024" in names and "index DiT" not in names  # cells given
