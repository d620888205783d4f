"""data_prep/encode_latents.py on a data shard (sphere SDF + renders) with a tiny random VAE run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d3ds2.training.dit_datamodule import read_latent_shard

ROOT = Path(__file__).resolve().parents[1]


def sphere_sample(key: str, res: int = 64, radius: float = 0.5, views: int = 2) -> dict:
    """Decoded data sample: every voxel of the 8^3 cells holding a voxel with |sdf| < 4 of a sphere."""
    g = np.stack(np.meshgrid(*[np.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    sdf = (np.linalg.norm(-1 + (g + 0.5) * 2 / res, axis=1) - radius) / (2 / res)
    cells = np.unique(g[np.abs(sdf) < 4] // 8, axis=0)
    offs = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    fine = (cells[:, None] * 8 + offs[None]).reshape(-1, 3)
    vals = (np.linalg.norm(-1 + (fine + 0.5) * 2 / res, axis=1) - radius) / (2 / res)
    rgba = np.zeros((views, 64, 64, 4), np.uint8)
    rgba[:, 16:48, 16:48] = (180, 40, 40, 255)
    cams = {k: np.zeros((views,), np.float32) for k in ("elevation", "azimuth", "focal_mm", "sensor_mm")}
    cams.update(intrinsics=np.tile(np.eye(3, dtype=np.float32), (views, 1, 1)), extrinsics=np.tile(np.eye(4, dtype=np.float32), (views, 1, 1)))
    return {"key": key, "meta": {}, "views": {"rgba": rgba, **cams},
            "sdf": {res: {"cells": cells.astype(np.int32), "sdf": np.clip(vals, -7.9, 7.9).reshape(-1, 8, 8, 8).astype(np.float32),
                          "sharp": np.zeros((len(cells), 8, 8, 8), bool), "band": 4.0, "trunc": 7.9375}}}


def test_encode_latents_writes_latents_and_views(tmp_path):
    pytest.importorskip("d3ds2.models.sparse_sdf_vae", reason="needs the sparse SDF VAE (VAE helper)")
    pytest.importorskip("d3ds2.data.sdf_transforms", reason="needs the VAE helper's SDF normalisation")
    from d3ds2.data.shard_format import encode_sample
    from d3ds2.data.shards import write_tar_atomic
    from test_inference import SPARSE_VAE, make_run

    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [sphere_sample("s0", radius=0.5), sphere_sample("s1", radius=0.7)]
    write_tar_atomic(str(shards / "rank000-00000.tar"), [encode_sample(s) for s in samples])
    vae = make_run(tmp_path, "vae", {"net": SPARSE_VAE}, 0)
    (vae / "config_resolved.yaml").write_text((vae / "config_resolved.yaml").read_text() + "data:\n  sdf_scale: 4.0\n")
    out = tmp_path / "latents"
    cmd = [sys.executable, str(ROOT / "data_prep" / "encode_latents.py"), "--shards", str(shards / "*.tar"), "--out", str(out),
           "--resolution", "64", "--vae", str(vae), "--features", "images", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = list(read_latent_shard(out / "rank000-00000.tar"))
    assert [g["key"] for g in got] == ["s0", "s1"]
    for g, s in zip(got, samples):
        cells = s["sdf"][64]["cells"]
        assert sorted(map(tuple, g["coords"].tolist())) == sorted(map(tuple, cells.tolist()))  # one token per occupied cell
        assert g["feats"].shape == (len(cells), SPARSE_VAE["latent_channels"]) and np.isfinite(g["feats"]).all()
        assert g["images"].shape == (2, 518, 518, 4) and g["images"][..., 3].max() == 255
