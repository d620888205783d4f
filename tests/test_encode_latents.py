"""`python -m data_prep.encode_latents` on data shards (sphere SDF + renders) with a tiny random VAE run."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d3ds2.data.latent_shards import read_latent_shard

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


def test_encode_latents_on_two_ranks_encodes_each_sample_once(tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank its shards, every sample once, split names kept, encoder
    metadata + stats written, a re-run resumes with nothing to do, latents of another VAE are refused."""
    pytest.importorskip("d3ds2.models.sparse_sdf_vae", reason="needs the sparse SDF VAE (VAE helper)")
    from d3ds2.data.layout import DataLayout
    from d3ds2.data.shard_format import encode_sample
    from d3ds2.data.shards import write_tar_atomic
    from test_inference import SPARSE_VAE, make_run

    layout = DataLayout(str(tmp_path / "data"))
    os.makedirs(layout.shards_dir)
    samples = {}
    for i, (split, index) in enumerate([("train", 0), ("train", 1), ("train", 2), ("val", 0)]):
        s = sphere_sample(f"s{i}", radius=0.45 + 0.1 * i, views=1)
        samples[s["key"]] = s
        write_tar_atomic(layout.shard(split, 0, index), [encode_sample(s)])
    vae = make_run(tmp_path, "vae", {"net": SPARSE_VAE}, 0)
    (vae / "config_resolved.yaml").write_text((vae / "config_resolved.yaml").read_text() + "data:\n  sdf_scale: 4.0\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "data_prep.encode_latents", f"data={layout.root}", "resolution=64", f"vae={vae}", "features=images",
           "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = Path(layout.latents_dir(64))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-rank000-00000.tar", "train-rank000-00001.tar",
                                                        "train-rank000-00002.tar", "val-rank000-00000.tar"]
    got = [g for p in sorted(out.glob("*.tar")) for g in read_latent_shard(str(p))]
    assert sorted(g["key"] for g in got) == sorted(samples)  # each sample encoded exactly once
    assert "'encoded_now': 2" in res.stdout and "rank': 1" in res.stdout  # both ranks took two shards
    for g in got:
        cells = samples[g["key"]]["sdf"][64]["cells"]
        assert sorted(map(tuple, g["coords"].tolist())) == sorted(map(tuple, cells.tolist()))  # one token per cell
        assert g["feats"].shape == (len(cells), SPARSE_VAE["latent_channels"]) and np.isfinite(g["feats"]).all()
        assert g["images"].shape == (1, 518, 518, 4) and g["images"][..., 3].max() == 255
    encoder = json.loads(Path(layout.latent_encoder(64)).read_text())
    ckpt = vae / "checkpoints" / "last.ckpt"
    assert encoder["vae_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() and encoder["sdf_scale"] == 4.0
    stats = json.loads(Path(layout.latent_stats(64)).read_text())
    train = np.concatenate([g["feats"].astype(np.float64) for g in got if g["key"] != "s3"])
    np.testing.assert_allclose(stats["mean"], train.mean(0), rtol=1e-6, atol=1e-9)  # the train split only
    # a re-run finds every shard done
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and again.stdout.count("'encoded_now': 0") == 2, again.stderr[-2000:]
    # a DiT stage on these latents with another VAE: a clear error naming both
    from d3ds2.training.dit_datamodule import LatentDataModule

    other = make_run(tmp_path, "other_vae", {"net": SPARSE_VAE}, 1)
    dm = LatentDataModule(str(out), None, vae_ckpt=str(other / "checkpoints" / "last.ckpt"))
    with pytest.raises(ValueError, match="encoded by the VAE .*vae/checkpoints/last.ckpt.*other_vae"):
        dm.setup("fit")
    LatentDataModule(str(out), None, vae_ckpt=str(ckpt)).setup("fit")  # the right VAE passes
