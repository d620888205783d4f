"""VAE training: a tiny model overfits one shape; Lightning fit + exact resume; bad input; CLI round trip."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from d3ds2.data.sdf_transforms import analytic_sample, collate
from d3ds2.models.sparse_sdf_vae import SparseSDFVAE
from d3ds2.models.vae_losses import VAELossWeights, vae_loss
from d3ds2.checkpoint import load_net_weights
from train_helpers import compose_train, run_composed

TINY = dict(model_channels=32, encoder_channels=(8, 16, 16, 32), decoder_channels=(16, 16, 8), num_blocks=2,
            num_heads=2, latent_channels=4)


def test_tiny_vae_overfits_one_shape():
    torch.manual_seed(0)
    batch = collate([analytic_sample("sphere", 16, radius=0.5)], 8.0)
    vae = SparseSDFVAE(**TINY)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    w = VAELossWeights()
    first = None
    for step in range(250):
        out, post = vae(batch.inputs, sample=False)
        loss, terms = vae_loss(out, post, batch.targets, w)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, f"loss {first:.4f} -> {loss.item():.4f} after {step + 1} steps"
    # the decoded SDF has the right sign: interior inside, exterior outside
    sign_ok = (torch.sign(out.sdf.feats[:, 0]) == torch.sign(batch.targets.feats[:, 0])).float().mean()
    assert sign_ok > 0.95


def _cfg(tmp_path: Path, *overrides: str):
    return compose_train("vae_tiny", tmp_path, *overrides)


_run = run_composed


SMALL = ["data.resolutions=[16,24]", "data.val_resolution=24", "trainer.limit_val_batches=1",
         "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.val_check_interval=3"]


def test_fit_resume_same_step_and_state(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    metrics = _run(_cfg(straight, "trainer.max_steps=6", *SMALL))
    assert "val/fscore" in metrics and "val/in" in metrics
    _run(_cfg(resumed, "trainer.max_steps=3", *SMALL))
    _run(_cfg(resumed, "trainer.max_steps=6", "ckpt_path=last", *SMALL))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, msg=f"weights differ after resume: {k}")
    for k, v in a["ema"].items():
        torch.testing.assert_close(b["ema"][k], v, msg=f"EMA differs after resume: {k}")
    assert list(straight.glob("val_renders/step_*.png"))
    text = next((straight / "csv").glob("version_*/metrics.csv")).read_text()
    for key in ("train/in", "train/ext", "train/sharp", "train/kl", "train/grad_norm", "train/tokens_per_s"):
        assert key in text
    # a checkpoint of another architecture is refused with a clear report
    with pytest.raises(ValueError, match="shape mismatches"):
        load_net_weights(straight / "checkpoints" / "last.ckpt", SparseSDFVAE(**TINY))


def test_non_finite_losses_skip_then_stop(tmp_path, caplog):
    cfg = _cfg(tmp_path, "trainer.max_steps=10", "model.max_consecutive_nonfinite=3", "model.w_in=nan", *SMALL)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        _run(cfg)
    assert "step skipped" in caplog.text


def test_cli_encode_decode_reconstruct(tmp_path):
    pytest.importorskip("open3d")
    import trimesh

    from hydra import compose, initialize_config_dir

    from d3ds2.vae.__main__ import run
    from train_helpers import CONFIGS

    def main(command: str, path, *overrides: str) -> dict:  # the CLI's config, as `python -m d3ds2.vae` reads it
        with initialize_config_dir(config_dir=CONFIGS, version_base=None):
            return run(compose("vae_tools", [f"command={command}", f"input={path}", f"ckpt={ckpt}", *overrides]))

    _run(_cfg(tmp_path / "run", "trainer.max_steps=2", *SMALL))
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    mesh_path = tmp_path / "ball.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.8).export(mesh_path)
    enc = main("encode", mesh_path, f"out={tmp_path / 'z.npz'}")
    assert enc["latent_voxels"] > 0 and enc["channels"] == 8
    main("decode", tmp_path / "z.npz", f"out={tmp_path / 'd.ply'}")
    assert (tmp_path / "d.ply").is_file()
    rec = main("reconstruct", mesh_path, f"out={tmp_path / 'r.ply'}")
    assert rec["resolution"] == 24 and (tmp_path / "r.ply").is_file()
    assert "fscore@0.01" in rec or "error" in rec
    with pytest.raises(ValueError, match="not a VAE latent file"):
        bad = tmp_path / "bad.npz"
        import numpy as np

        np.savez(bad, x=np.zeros(3))
        main("decode", bad)


def test_renders_turn_off_without_open3d(monkeypatch, caplog):
    """A machine without open3d (e.g. a GPU node) keeps training and scoring; only the pictures are dropped."""
    import importlib.util

    from d3ds2.training import vae_module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open3d" else real(name, *a))
    with caplog.at_level("WARNING"):
        module = vae_module.VAEModule(net=torch.nn.Linear(1, 1), optimizer=None, render_meshes=2)
    assert module.render_meshes == 0 and "open3d is not installed" in caplog.text
