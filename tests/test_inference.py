"""Image -> mesh on CPU with tiny random checkpoints: pipeline API (batch of images) and inference.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from d3ds2.pipeline import ImageTo3DPipeline, StageSampling, extract_meshes, occupied_cells, refine_cells
from d3ds2.sparse import SparseTensor

ROOT = Path(__file__).resolve().parents[1]
TINY_DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 518,
             "patch_size": 14, "num_register_tokens": 4}
INDEX_VAE = {"_target_": "d3ds2.models.dense_vae.DenseShapeVAE", "latent_channels": 8, "encoder_channels": [4, 8, 16],
             "decoder_channels": [16, 8, 4], "encoder_blocks": 1, "decoder_blocks": 1, "encoder_middle_blocks": 1, "decoder_middle_blocks": 1}
INDEX_DIT = {"_target_": "d3ds2.models.dense_dit.DenseDiT", "resolution": 2, "in_channels": 8, "model_channels": 32,
             "cond_channels": 32, "num_blocks": 1, "num_heads": 4}
SPARSE_DIT = {"_target_": "d3ds2.models.sparse_dit.SparseDiT", "in_channels": 8, "model_channels": 32, "cond_channels": 32,
              "num_blocks": 1, "num_heads": 4, "num_kv_heads": 2, "attention": "full", "window_size": 4}
SPARSE_VAE = {"_target_": "d3ds2.models.sparse_sdf_vae.SparseSDFVAE", "latent_channels": 8, "model_channels": 32,
              "encoder_channels": [8, 8, 8, 32], "decoder_channels": [16, 8, 8], "num_blocks": 1, "num_heads": 2, "window": 4}


def make_run(root: Path, name: str, model: dict, seed: int) -> Path:
    """A fake train.py run: config_resolved.yaml + checkpoints/last.ckpt with random (non-zero) weights."""
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    net = instantiate(model["net"])
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({"model": model}))
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    pytest.importorskip("d3ds2.models.sparse_sdf_vae", reason="needs the sparse SDF VAE (VAE helper)")
    root = tmp_path_factory.mktemp("runs")
    vae = make_run(root, "index_vae", {"net": INDEX_VAE}, 0)
    return {
        "index_dit": make_run(root, "index_dit", {"net": INDEX_DIT, "vae": INDEX_VAE, "vae_ckpt": str(vae / "checkpoints" / "last.ckpt")}, 1),
        "sparse_dit_512": make_run(root, "dit", {"net": SPARSE_DIT, "conditioner": {
            "_target_": "d3ds2.models.conditioner.ImageConditioner", "config": TINY_DINO}}, 2),
        "vae_512": make_run(root, "vae", {"net": SPARSE_VAE}, 3),
    }


def rgba_image(path: Path, colour) -> Path:
    from PIL import Image

    img = np.zeros((96, 80, 4), np.uint8)
    img[20:70, 15:60] = (*colour, 255)
    Image.fromarray(img, "RGBA").save(path)
    return path


FAST = dict(dense=StageSampling(3, 6.0, 7.0), sparse_512=StageSampling(3, 6.0, 7.0))


def test_pipeline_batch_of_images(runs, tmp_path):
    pytest.importorskip("d3ds2.geometry.marching_cubes", reason="needs the sparse marching cubes (data helper)")
    pipe = ImageTo3DPipeline.from_runs(**{k: str(v) for k, v in runs.items()}, index_threshold=0.97)
    a, b = rgba_image(tmp_path / "a.png", (200, 30, 30)), rgba_image(tmp_path / "b.png", (30, 30, 200))
    meshes = pipe([a, b], seed=0, **FAST)
    assert len(meshes) == 2 and all(len(m.faces) > 0 for m in meshes)
    assert [r.name for r in pipe.reports] == ["condition", "index DiT", "sparse DiT 512", "VAE decode 512", "mesh"]
    assert np.all(np.abs(meshes[0].vertices) <= 1.0 + 2 / 64)  # [-1, 1] frame (+ half a voxel at the grid border)


def test_pipeline_refinement_stage(runs, tmp_path):
    pytest.importorskip("d3ds2.geometry.marching_cubes", reason="needs the sparse marching cubes (data helper)")
    pipe = ImageTo3DPipeline.from_runs(**{k: str(v) for k, v in runs.items()}, sparse_dit_1024=str(runs["sparse_dit_512"]),
                                       vae_1024=str(runs["vae_512"]), index_threshold=0.99)
    (mesh,) = pipe([rgba_image(tmp_path / "a.png", (200, 30, 30))], resolution=1024, sparse_1024=StageSampling(2, 8.0, 7.0), **FAST)
    names = [r.name for r in pipe.reports]
    assert names[-3:] == ["sparse DiT 1024", "VAE decode 1024", "mesh"]
    cells_512 = pipe.reports[2].info["tokens"]
    assert pipe.reports[4].info["tokens"] > cells_512  # the finer stage has more latent cells
    assert len(mesh.faces) > 0 and np.all(np.abs(mesh.vertices) <= 1.0 + 2 / 128)


def test_inference_script_writes_mesh(runs, tmp_path):
    pytest.importorskip("d3ds2.geometry.marching_cubes", reason="needs the sparse marching cubes (data helper)")
    image = rgba_image(tmp_path / "view.png", (30, 160, 30))
    out = tmp_path / "mesh.glb"
    cmd = [sys.executable, str(ROOT / "inference.py"), f"image={image}", f"out={out}", "device=cpu",
           f"ckpt.index_dit={runs['index_dit']}", f"ckpt.sparse_dit_512={runs['sparse_dit_512']}", f"ckpt.vae_512={runs['vae_512']}",
           "dense.steps=2", "sparse_512.steps=2", "simplify=0.5", "index_threshold=0.97"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import trimesh

    mesh = trimesh.load(out, force="mesh")
    assert len(mesh.faces) > 0 and "peak" in res.stdout


def _sphere_band(res: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine voxels of the 8^3 cells near a sphere and its SDF normalised like the VAE's tanh output."""
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).view(-1, 3)
    p = -1 + (g.float() + 0.5) * 2 / res
    sdf = (p.norm(dim=1) - radius) / (2 / res)  # voxel units, negative inside
    cells = torch.unique(g[sdf.abs() < 2] // 8, dim=0)
    fine = (cells[:, None] * 8 + torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).view(1, -1, 3)).view(-1, 3)
    pf = -1 + (fine.float() + 0.5) * 2 / res
    return fine, ((pf.norm(dim=1) - radius) / (2 / res) / 4).clamp(-1, 1)


def test_mesh_stage_sphere_interior_inside_no_inner_shell():
    pytest.importorskip("d3ds2.geometry.marching_cubes", reason="needs the sparse marching cubes (data helper)")
    res, radii = 64, (0.6, 0.35)
    bands = [_sphere_band(res, r) for r in radii]
    x = SparseTensor.from_samples([v[:, None] for _, v in bands], [c for c, _ in bands])
    pipe = ImageTo3DPipeline.__new__(ImageTo3DPipeline)
    pipe.mc_level, pipe.mesh_workers = 0.0, 1
    meshes, _ = pipe._meshes(x, res, None)
    for mesh, radius in zip(meshes, radii):
        assert mesh.is_watertight and mesh.body_count == 1  # a single closed surface: no inner shell
        assert abs(mesh.volume - 4 / 3 * np.pi * radius**3) < 0.03 * 4 / 3 * np.pi * radius**3
    # the same meshes from two worker processes
    parallel = extract_meshes(x, res, 0.0, workers=2)
    for a, b in zip(meshes, parallel):
        assert np.array_equal(a.faces, b.faces) and np.array_equal(a.vertices, b.vertices)


def test_occupied_cells_and_refinement():
    logits = torch.full((2, 4, 4, 4), -5.0)
    logits[0, 1, 2, 3] = 5.0
    logits[1, 0, 0, 1] = -1.0  # below threshold: the best cell is kept so the sample has tokens
    cells = occupied_cells(logits, 0.1)
    assert cells.tolist() == [[0, 1, 2, 3], [1, 0, 0, 1]]
    sdf = SparseTensor(torch.tensor([[0.1], [0.9], [-0.2]]), torch.tensor([[0, 8, 8, 8], [0, 9, 8, 8], [1, 31, 0, 4]], dtype=torch.int32), 2)
    assert refine_cells(sdf, 0.5, 128).tolist() == [[0, 2, 2, 2], [1, 7, 0, 1]]
