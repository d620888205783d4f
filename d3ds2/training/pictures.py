"""Pictures of what a stage makes, published at validation: a PNG in the run folder and every image logger.

Each stage builds one RGB uint8 picture per validation (reconstructions, occupancy projections, decoded
samples beside the ground truth) and calls :func:`publish_picture`; rank 0 writes
``<run dir>/val_renders/step_XXXXXXX.png`` and sends it to TensorBoard (``add_image``) and wandb
(``log_image``), so it appears every ``trainer.val_check_interval`` steps.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def occupancy_projections(occ: torch.Tensor | np.ndarray, size: int = 128) -> np.ndarray:
    """Dense occupancy [R, R, R] (bool / 0-1) -> RGB uint8 [size, 3 * size, 3]: the fraction of occupied cells
    along x, y and z (dark = many), side by side."""
    occ = torch.as_tensor(occ).float()
    tiles = []
    for axis in range(3):
        proj = 1.0 - occ.mean(axis).clamp(0, 1) ** 0.5
        img = torch.nn.functional.interpolate(proj[None, None], size=(size, size), mode="nearest")[0, 0]
        tiles.append((img.numpy() * 255).astype(np.uint8))
    gray = np.concatenate(tiles, axis=1)
    return np.repeat(gray[..., None], 3, axis=2)


def image_tile(image: torch.Tensor, size: int) -> np.ndarray:
    """A view [C >= 3, H, W] float in [0, 1] (RGB(+mask)) -> RGB uint8 [size, size, 3]."""
    rgb = torch.nn.functional.interpolate(image[None, :3].float().cpu(), size=(size, size), mode="bilinear",
                                          align_corners=False)[0]
    return (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def render_pair(meshes: list, size: int = 192) -> np.ndarray:
    """RGB uint8 [size, size * len(meshes), 3]: each mesh from the same fixed camera, side by side."""
    from ..geometry.render import Camera, Renderer, look_at

    eye = np.array([1.6, 1.2, 2.2]) * 1.4
    fpx = size * 1.3
    cam = Camera(np.array([[fpx, 0, size / 2], [0, fpx, size / 2], [0, 0, 1]], np.float32),
                 look_at(eye).astype(np.float32), 0.0, 0.0, 50.0, 36.0, size)
    tiles = []
    for m in meshes:
        tiles.append(Renderer(m).render(cam)[..., :3] if len(m.faces) else np.full((size, size, 3), 255, np.uint8))
    return np.concatenate(tiles, axis=1)


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of RGB uint8 pictures (same height per row) -> one picture, rows padded white to the widest."""
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def publish_picture(module, image: np.ndarray | None, tag: str) -> Path | None:
    """Write ``image`` (RGB uint8 [H, W, 3]; None when there is nothing to show) for the module's current
    step to ``<run dir>/val_renders/`` and the loggers; only rank 0 writes."""
    trainer = module.trainer
    if image is None or not trainer.is_global_zero:
        return None
    root = Path(trainer.default_root_dir)
    step = module.global_step
    path = root / "val_renders" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(image).save(tmp)
    tmp.replace(path)
    for lg in module.loggers:
        exp = getattr(lg, "experiment", None)
        if hasattr(lg, "log_image"):  # wandb
            lg.log_image(key=tag, images=[image], step=step)
        elif hasattr(exp, "add_image"):  # TensorBoard
            exp.add_image(tag, image, step, dataformats="HWC")
    return path


def open3d_available(what: str) -> bool:
    """Whether meshes can be rendered (open3d); warns once per caller otherwise."""
    import importlib.util

    if importlib.util.find_spec("open3d") is not None:
        return True
    log.warning("%s: open3d is not installed, so no mesh pictures are drawn (pip install open3d, or set "
                "it to 0 to silence this)", what)
    return False


class PicturesAtValidation:
    """Mixin for a BaseModule: the first validation batch of every validation (rank 0) becomes a picture,
    :meth:`make_picture` (under no_grad, EMA weights when the EMA callback swaps them in), published at the
    end of the validation epoch. Subclasses set ``picture_samples`` (0: off) and ``picture_tag``."""

    picture_samples = 0
    picture_tag = "val/samples"
    _picture: np.ndarray | None = None

    def make_picture(self, batch) -> np.ndarray | None:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        trainer = self._trainer
        if (batch_idx == 0 and self.picture_samples and trainer is not None and not trainer.sanity_checking
                and trainer.is_global_zero):
            with torch.no_grad():
                self._picture = self.make_picture(batch)

    def on_validation_epoch_end(self) -> None:
        picture, self._picture = self._picture, None
        if self._trainer is None or self.trainer.sanity_checking:
            return
        publish_picture(self, picture, self.picture_tag)
