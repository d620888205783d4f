"""CLIP image tower of an alignment model (transformers ``CLIPVisionModelWithProjection``).

ULIP-2 and OpenShape align their point encoders with OpenCLIP's ViT-bigG-14 image embedding; LAION publishes
that model in transformers format too (``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``), so it loads from a
local directory or the hub like the DINOv2 conditioner. Images go through the conditioner's preprocessing
(foreground crop from the alpha channel or the background estimate, composited over white, square), then
CLIP's resize and normalisation.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.conditioner import preprocess_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BIGG_14 = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


class ImageTower(nn.Module):
    """What every image tower shares: ``preprocess(list) -> [B, 3, S, S]`` in [0, 1], and ``pixels``, the resize
    (bicubic, to ``image_size``) and mean/std normalisation, in float32. Subclasses embed.

    ``preprocess`` has two modes: ``centre_crop_pct = None`` (default): the conditioner's foreground crop on white;
    a number p: the torchvision-style evaluation transform of timm / OpenCLIP (alpha dropped by a plain RGB
    conversion, shorter side resized to floor(S / p) bicubic, centre crop S), what the FlashVDM protocol runs.
    """

    def __init__(self, image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD) -> None:
        super().__init__()
        self.image_size = image_size
        self.centre_crop_pct: float | None = None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: list) -> torch.Tensor:
        """Paths / PIL images / arrays -> [B, 3, S, S] in [0, 1] (see the class docstring for the two modes)."""
        if self.centre_crop_pct is not None:
            return torch.stack([centre_crop(im, self.image_size, self.centre_crop_pct) for im in images])
        return torch.stack([preprocess_image(im, size=self.image_size, pad=0)[:3] for im in images])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised float32 [B, 3, S, S] on the tower's device."""
        x = images.to(self.mean.device, torch.float32)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std


def centre_crop(image, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """A path / PIL image / array -> [3, size, size] in [0, 1]: ``convert("RGB")`` (alpha dropped, not
    composited), shorter side resized to floor(size / crop_pct) (bicubic), centre crop (torchvision's rounding)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    scale = math.floor(size / crop_pct)
    w, h = image.size
    new = (scale, max(1, int(scale * h / w))) if w <= h else (max(1, int(scale * w / h)), scale)
    image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ClipImageTower(ImageTower):
    """Frozen CLIP vision tower with its projection.

    Args:
        source: local directory or hub id of a transformers CLIP checkpoint (full CLIP or vision-only);
            ignored when ``config`` is given.
        config: kwargs of a ``CLIPVisionConfig`` (plus ``projection_dim``) for a randomly initialised tower
            (tests), seeded by ``seed``.
    forward(images [B, 3, S, S] in [0, 1], white background) -> unit-norm embeddings [B, projection_dim].
    """

    def __init__(self, source: str = BIGG_14, config: dict | None = None, seed: int = 0) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        else:
            try:
                model = CLIPVisionModelWithProjection.from_pretrained(source)
            except OSError as e:
                raise OSError(f"ClipImageTower: cannot load CLIP weights from {source!r}; give a local directory "
                              "holding a transformers CLIP checkpoint (config.json + weights) or a reachable hub "
                              "id") from e
        super().__init__(model.config.image_size)
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.model(pixel_values=self.pixels(images)).image_embeds
        return F.normalize(emb.float(), dim=-1)
