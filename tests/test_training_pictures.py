"""Every stage publishes a picture at validation: a PNG in the run folder and an image in TensorBoard
(tiny runs on the CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from d3ds2.data.latent_shards import write_latent_shard
from d3ds2.training.pictures import occupancy_projections
from test_dit_training import synthetic_sample
from train_helpers import compose_train, run_composed

VALIDATE_AT_2 = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 "logger=many", "callbacks.model_checkpoint.every_n_train_steps=2"]


def tensorboard_images(run: Path) -> dict[str, list[int]]:
    """{image tag: [steps]} of the run's TensorBoard event files."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def picture(run: Path, step: int) -> np.ndarray:
    path = run / "val_renders" / f"step_{step:07d}.png"
    assert path.is_file(), sorted(p.name for p in run.rglob("*.png"))
    return np.asarray(Image.open(path))


def test_occupancy_projections_show_the_shape():
    occ = np.zeros((8, 8, 8), bool)
    occ[2:4, 2:4, :] = True  # a bar along z
    img = occupancy_projections(occ, size=8)
    assert img.shape == (8, 24, 3)
    along_z = img[:, 16:, 0]  # projection along z: a dark 2x2 square, white elsewhere
    assert along_z[2:4, 2:4].max() == 0 and along_z[5:, 5:].min() == 255


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Latent shards at fine 128 (grid 16, 8 channels) and a finished vae_tiny run of the same channels."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    samples = [synthetic_sample("a", 16, 4.0, (220, 20, 20), rng), synthetic_sample("b", 16, 6.4, (20, 20, 220), rng)]
    latents = root / "data" / "latents" / "128"
    write_latent_shard(latents / "train-000.tar", samples)
    feats = np.concatenate([s["feats"] for s in samples])
    (latents / "stats.json").write_text(json.dumps({"mean": feats.mean(0).tolist(), "std": feats.std(0).tolist()}))
    run = root / "logs" / "vae_tiny" / "v"
    run_composed(compose_train("vae_tiny", run, f"paths.root_dir={root}", *VALIDATE_AT_2, "data.resolutions=[16]",
                               "data.val_resolution=16", "model.render_meshes=1"))
    return root


def test_vae_reconstructions_land_in_tensorboard(root):
    run = root / "logs" / "vae_tiny" / "v"
    assert tensorboard_images(run) == {"val/reconstructions": [2]}
    img = picture(run, 2)
    assert img.shape[1] == 2 * img.shape[0] and img.std() > 0  # truth | reconstruction


def test_index_and_dit_stages_draw_samples(root):
    data = [f"paths.root_dir={root}", *VALIDATE_AT_2, f"data.val_shards={root}/data/latents/128/train-*.tar"]
    index_vae = root / "logs" / "index_vae_tiny" / "i"
    run_composed(compose_train("index_vae_tiny", index_vae, *data))
    assert tensorboard_images(index_vae) == {"val/occupancy": [2]}
    img = picture(index_vae, 2)  # per sample: truth (3 projections) | reconstruction (3 projections)
    assert img.shape == (2 * 128, 6 * 128, 3) and img[:, : 3 * 128].min() < 128  # the truth is not empty

    index_dit = root / "logs" / "index_dit_tiny" / "d"
    run_composed(compose_train("index_dit_tiny", index_dit, *data, "model.picture_sampling.steps=2"))
    assert tensorboard_images(index_dit) == {"val/samples": [2]}
    img = picture(index_dit, 2)  # per sample: the input view | truth | sample
    assert img.shape == (2 * 128, 7 * 128, 3)
    assert img[:128, :128, 0].mean() > img[:128, :128, 2].mean()  # sample a's view shows a red disc

    dit = root / "logs" / "dit_tiny" / "s"
    run_composed(compose_train("dit_tiny", dit, *data, "model.picture_sampling.steps=2", "model.picture_samples=1"))
    assert tensorboard_images(dit) == {"val/samples": [2]}
    img = picture(dit, 2)  # the input view | VAE decode of the true latent | of the sampled latent
    assert img.shape == (192, 3 * 192, 3)
    assert json.loads((dit / "finished.json").read_text())["global_step"] == 2
    from omegaconf import OmegaConf

    assert OmegaConf.load(dit / "config_resolved.yaml").model.vae_ckpt == str(
        root / "logs" / "vae_tiny" / "v" / "checkpoints" / "last.ckpt")


def test_pictures_reach_wandb_offline(tmp_path, monkeypatch):
    """logger=wandb (offline, the default): the VAE's reconstructions land in the offline run's media."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_composed(compose_train("vae_tiny", run, f"paths.root_dir={tmp_path}", *VALIDATE_AT_2, "logger=[csv,wandb]",
                               "data.resolutions=[16]", "data.val_resolution=16", "model.render_meshes=1"))
    import wandb

    wandb.finish()
    images = list(run.glob("wandb/offline-run-*/files/media/images/val/reconstructions_*.png"))
    assert len(images) == 1 and np.asarray(Image.open(images[0])).shape == picture(run, 2).shape
