"""DiT/index training from the Hydra experiments on synthetic latent shards (CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from d3ds2.data.latent_shards import LatentStream, latent_shard_urls, read_latent_shard, write_latent_shard
from d3ds2.training.runner import run_training

CONFIGS = str(Path(__file__).resolve().parents[1] / "d3ds2" / "configs")


def synthetic_sample(key: str, grid: int, radius: float, colour, rng: np.random.Generator, views: int = 2) -> dict:
    """A sphere shell of latent cells on a grid^3 latent grid, latents = smooth function of position, and
    preprocessed views showing a disc of ``colour`` (the condition)."""
    g = np.stack(np.meshgrid(*[np.arange(grid)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm(g + 0.5 - grid / 2, axis=1)
    coords = g[np.abs(d - radius) < 0.9]
    feats = np.concatenate([np.sin(coords[:, :1] * np.arange(1, 9) / 7.0 + radius)], 1)
    yy, xx = np.mgrid[:518, :518]
    disc = (xx - 259) ** 2 + (yy - 259) ** 2 < (60 + 40 * radius) ** 2
    img = np.full((518, 518, 4), 255, np.uint8)
    img[..., 3] = 0
    img[disc] = (*colour, 255)
    images = np.stack([img] * views)
    images[1:, :5] = rng.integers(0, 255, (views - 1, 5, 518, 4))  # views differ a little
    return {"key": key, "coords": coords, "feats": feats, "resolution": grid * 8, "images": images}


@pytest.fixture(scope="module")
def latent_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    samples = [synthetic_sample("a", 16, 4.0, (220, 20, 20), rng), synthetic_sample("b", 16, 6.4, (20, 20, 220), rng)]
    write_latent_shard(root / "data" / "latents" / "128" / "train-000.tar", samples)
    feats = np.concatenate([s["feats"] for s in samples])
    (root / "data" / "latents" / "128" / "stats.json").write_text(json.dumps({"mean": feats.mean(0).tolist(), "std": feats.std(0).tolist()}))
    return root


def test_latent_shard_roundtrip_and_token_budget(latent_root):
    paths = latent_shard_urls(str(latent_root / "data/latents/128/train-*.tar"))
    samples = list(read_latent_shard(paths[0]))
    assert [s["key"] for s in samples] == ["a", "b"] and samples[0]["images"].shape == (2, 518, 518, 4)
    n = [len(s["coords"]) for s in samples]
    batches = list(LatentStream(paths, batch_tokens=max(n), shuffle=False, loop=False))
    assert [b["latent"].batch_size for b in batches] == [1, 1]  # the second sample would exceed the budget
    both = next(iter(LatentStream(paths, batch_tokens=sum(n), shuffle=False, loop=False)))
    assert both["latent"].num_voxels == sum(n) and both["images"].shape == (2, 4, 518, 518)
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        latent_shard_urls(str(latent_root / "nothing-*.tar"))
    # two DataLoader workers over one shard split its samples, together reading each once
    loader = torch.utils.data.DataLoader(LatentStream(paths, batch_tokens=10**6, shuffle=False, loop=False), batch_size=None, num_workers=2)
    assert sorted(k for b in loader for k in b["keys"]) == ["a", "b"]


def test_cached_stream_reads_the_shards_once(latent_root, tmp_path):
    shard = tmp_path / "train-000.tar"
    shard.write_bytes(Path(latent_shard_urls(str(latent_root / "data/latents/128/train-*.tar"))[0]).read_bytes())
    stream = iter(LatentStream([str(shard)], batch_tokens=10**6, max_batch=1, shuffle=True, loop=True, cache=True))
    first = [next(stream)["keys"][0] for _ in range(2)]
    shard.unlink()  # later passes come from memory (an uncached stream would fail to reopen the shard)
    later = [next(stream)["keys"][0] for _ in range(6)]
    assert sorted(first) == ["a", "b"] and sorted(later) == ["a"] * 3 + ["b"] * 3


def _train(root: Path, out: Path, experiment: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.root_dir={root}", "logger=csv", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.callbacks.pop("progress_bar")
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    HydraConfig.instance().set_config(cfg)
    return run_training(cfg)


def test_tiny_experiments_train_and_chain(latent_root, tmp_path):
    logs = latent_root / "logs"
    m = _train(latent_root, logs / "index_vae_tiny" / "demo", "index_vae_tiny", "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=4")
    assert np.isfinite(m["train/loss"])
    m = _train(latent_root, logs / "index_dit_tiny" / "demo", "index_dit_tiny", "trainer.max_steps=3")
    assert np.isfinite(m["train/loss"])
    m = _train(latent_root, logs / "dit_tiny" / "demo", "dit_tiny", "trainer.max_steps=3", "vae_from=none")
    assert np.isfinite(m["train/loss"])
    ckpt = torch.load(logs / "dit_tiny" / "demo" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "ema" in ckpt and not any(k.startswith("conditioner") for k in ckpt["state_dict"])
    # the next progressive stage starts from this checkpoint's EMA weights
    _train(latent_root, tmp_path / "next", "dit_tiny", "trainer.max_steps=1", "vae_from=none",
           f"init_from={logs / 'dit_tiny' / 'demo' / 'checkpoints' / 'last.ckpt'}")
