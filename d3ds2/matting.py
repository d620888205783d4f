"""Foreground matting for images without alpha: a segmentation model loaded from a local folder.

The official pipeline uses BiRefNet (``ZhengPeng7/BiRefNet``) through transformers: 1024² input with ImageNet
normalisation, sigmoid of the last output, resized back. That repository ships its model code, so loading it
runs the Python files of the folder you give (``trust_remote_code``): give a folder you downloaded yourself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationMatting:
    """Callable RGB [H, W, 3] float in [0, 1] -> mask [H, W] float in [0, 1] from an image-segmentation model."""

    def __init__(self, model: torch.nn.Module, size: int = 1024, device: str | torch.device = "cpu"):
        self.model, self.size, self.device = model.eval().to(device), size, torch.device(device)

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(rgb, np.float32)).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        dtype = next(self.model.parameters()).dtype
        out = self.model(x.to(self.device, dtype))
        logits = out[-1] if isinstance(out, (list, tuple)) else getattr(out, "logits", out)
        mask = torch.sigmoid(logits.float()).cpu()
        return F.interpolate(mask.view(1, 1, *mask.shape[-2:]), size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def load_matting(path: str | Path, device: str | torch.device = "cpu", size: int = 1024) -> SegmentationMatting:
    """A matting model from a local transformers folder (e.g. BiRefNet: config.json + weights + its model code)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"matting={path}: expected a local folder with config.json and the weights of an image "
                                "segmentation model (e.g. huggingface-cli download ZhengPeng7/BiRefNet --local-dir DIR)")
    from transformers import AutoModelForImageSegmentation

    model = AutoModelForImageSegmentation.from_pretrained(str(path), trust_remote_code=True)
    return SegmentationMatting(model, size, device)
