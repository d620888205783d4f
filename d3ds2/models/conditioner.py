"""Image condition: DINOv2-L/14 with registers (transformers), white-background preprocessing, dense or
sparse (foreground-only) tokens.

Features are the tokens before DINOv2's final LayerNorm (the last entry of ``hidden_states``), normalised by
a LayerNorm without affine: [B, 1 + registers + (S/14)^2, C] = [B, 1374, 1024] for 518^2 input.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit_layers import SparseCondition

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "facebook/dinov2-with-registers-large"
# transformers config of DINOv2-L/14 with registers at 518^2 (the official encoder's architecture): builds a
# random-weight encoder of the official size, ImageConditioner(config=DINOV2_L_REG_CONFIG)
DINOV2_L_REG_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
                           patch_size=14, num_register_tokens=4, layerscale_value=1.0)


# ------------------------------------------------------------------------------------------------
# preprocessing
MAX_IMAGE_SIDE = 2048  # larger images are reduced on load (the encoder sees 518 px)


def open_image(path: str | Path, max_side: int = MAX_IMAGE_SIDE):
    """A PIL image of ``path`` no larger than about ``max_side`` per side: JPEGs are decoded at a reduced scale
    (``draft``), others reduced by an integer factor right after decoding. Clear errors for a missing file or
    one that is not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        im = Image.open(path)
        if im.format == "JPEG" and max(im.size) > max_side:
            im.draft("RGB", (max_side, max_side))  # DCT-domain downscale: never decoded at full size
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); give a PNG / JPEG / WebP / BMP file") from e
    factor = max(im.size) // max_side
    if factor > 1:
        im = im.reduce(factor)
    return im


def _load_rgba(image) -> tuple[np.ndarray, bool]:
    """(float32 [H, W, 4] in [0, 1], has_alpha) from a path, PIL image or uint8/float array (H, W, 3|4)."""
    name = str(image) if isinstance(image, (str, Path)) else "the image"
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if hasattr(image, "mode"):  # PIL
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        image = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{name}: image must be [H, W, 3|4], got shape {arr.shape}")
    if min(arr.shape[:2]) < 2:
        raise ValueError(f"{name}: a {arr.shape[1]}x{arr.shape[0]} image has nothing to condition on; give a photo of "
                         "the object (at least a few dozen pixels per side)")
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    has_alpha = arr.shape[2] == 4 and bool((arr[..., 3] < 1.0).any())
    if has_alpha and not (arr[..., 3] > 0).any():
        raise ValueError(f"{name}: the image is fully transparent, so there is nothing to condition on; give an image "
                         "whose alpha marks the object (or one without alpha)")
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.ones_like(arr[..., :1])], axis=2)
    return arr, has_alpha


def _warn_heuristic() -> None:
    """Python shows a warning once per call site by default: once per process here."""
    warnings.warn("image without alpha and no matting model: the foreground is guessed from the border colour "
                  "(fails on cluttered backgrounds); give RGBA images or a matting model (inference.py "
                  "matting=DIR, e.g. a local BiRefNet)", stacklevel=3)


def estimate_foreground(rgb: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Fallback mask for images without alpha: pixels whose colour differs from the background colour (the
    median of the border pixels) by more than ``threshold`` in any channel, holes filled. [H, W] float32."""
    from scipy.ndimage import binary_fill_holes

    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.abs(rgb - bg).max(axis=2) > threshold
    return binary_fill_holes(fg).astype(np.float32)


def preprocess_image(image, size: int = 518, pad: int = 16, matting=None) -> torch.Tensor:
    """Image -> [4, size, size]: RGB composited over white (in [0, 1]) + foreground mask.

    Foreground = the alpha channel when present, else ``matting(rgb [H, W, 3]) -> mask [H, W]`` when given (a
    matting model, see :func:`d3ds2.matting.load_matting`), else :func:`estimate_foreground` (warned: a
    border-colour heuristic that fails on cluttered backgrounds). Crop to the foreground
    bbox (whole image if it covers < 0.1%), pad to a square, resize to ``size``, pad ``pad`` px per side and
    resize back (the official inference preprocessing).
    """
    arr, has_alpha = _load_rgba(image)
    rgb = arr[..., :3]
    if has_alpha:
        alpha = arr[..., 3]
    elif matting is not None:
        alpha = np.clip(np.asarray(matting(rgb), np.float32), 0.0, 1.0)
    else:
        _warn_heuristic()
        alpha = estimate_foreground(rgb)
    ys, xs = np.nonzero(alpha > 0)
    if ys.size >= 0.001 * alpha.size:
        rgb, alpha = rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rgb = rgb * alpha[..., None] + (1 - alpha[..., None])
    h, w = alpha.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    img = torch.ones(3, side, side)
    img[:, top : top + h, left : left + w] = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    mask = torch.zeros(1, side, side)
    mask[0, top : top + h, left : left + w] = torch.from_numpy(np.ascontiguousarray(alpha))

    def fit(rgb_t: torch.Tensor, mask_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = F.interpolate(rgb_t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        m = F.interpolate(mask_t[None], size=(size, size), mode="nearest")[0]
        return r.clamp(0, 1), m

    img, mask = fit(img, mask)
    img, mask = fit(F.pad(img, (pad,) * 4, value=1.0), F.pad(mask, (pad,) * 4, value=0.0))
    return torch.cat([img, mask])


# ------------------------------------------------------------------------------------------------
# encoder
class ImageConditioner(nn.Module):
    """Frozen DINOv2-with-registers encoder.

    Args:
        backbone: local directory or hub id of a transformers DINOv2-with-registers model (loaded with
            ``from_pretrained``); ignored when ``config`` is given.
        config: kwargs of a ``Dinov2WithRegistersConfig`` to build a randomly initialised model (tests, the
            demo), initialised from ``seed`` so that training and inference see the same encoder.
        image_size: input side (518).
    forward(images [B, 3|4, S, S] in [0, 1]) -> dense tokens [B, L, C];
    sparse(tokens, masks) -> :class:`SparseCondition` of foreground patches + class/register tokens.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, config: dict | None = None, image_size: int = 518, seed: int = 0) -> None:
        super().__init__()
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        if config is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.backbone = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config))
        else:
            try:
                self.backbone = Dinov2WithRegistersModel.from_pretrained(backbone)
            except OSError as e:
                raise OSError(
                    f"ImageConditioner: cannot load DINOv2 weights from {backbone!r}; give a local directory "
                    "holding a transformers Dinov2WithRegisters checkpoint (config.json + model.safetensors) "
                    "or a reachable hub id"
                ) from e
        self.backbone.eval().requires_grad_(False)
        cfg = self.backbone.config
        self.image_size, self.patch_size = image_size, cfg.patch_size
        self.channels = cfg.hidden_size
        self.num_prefix = 1 + cfg.num_register_tokens
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageConditioner":  # the backbone stays in eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + (self.image_size // self.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (3, 4) or images.shape[-1] != self.image_size:
            raise ValueError(
                f"ImageConditioner: expected images [B, 3|4, {self.image_size}, {self.image_size}] in [0, 1], got {tuple(images.shape)}"
            )
        pixels = (images[:, :3].float() - self.mean) / self.std
        hidden = self.backbone(pixel_values=pixels.to(self.backbone.dtype), output_hidden_states=True).hidden_states[-1]
        return F.layer_norm(hidden.float(), (self.channels,))

    def patch_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """masks [B, 1, S, S] -> [B, (S/p)^2] bool: patches with any foreground pixel, row-major."""
        return (F.max_pool2d(masks.float(), self.patch_size, self.patch_size) > 0).flatten(1)

    def sparse(self, tokens: torch.Tensor, masks: torch.Tensor) -> SparseCondition:
        """Keep the class/register tokens and the foreground patches of masks [B, 1, S, S]."""
        return sparse_condition(tokens, self.patch_mask(masks).to(tokens.device))


def sparse_condition(tokens: torch.Tensor, fg: torch.Tensor) -> SparseCondition:
    """tokens [B, prefix + P, C] and foreground patches fg [B, P] (row-major square grid) -> the prefix
    (class/register) tokens at position (0, 0, 1) + foreground patches at (col, row, 0)."""
    b, length, _ = tokens.shape
    p = fg.shape[1]
    grid, num_prefix = int(round(p**0.5)), length - p
    if grid * grid != p or num_prefix < 0:
        raise ValueError(f"sparse_condition: fg [B, {p}] is not a square patch grid of the {length} tokens")
    keep = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=tokens.device), fg.bool().to(tokens.device)], 1)
    idx = torch.arange(p, device=tokens.device)
    patch_pos = torch.stack([idx % grid, idx // grid, torch.zeros_like(idx)], 1)
    prefix_pos = torch.tensor([[0, 0, 1]], device=tokens.device).expand(num_prefix, 3)
    pos = torch.cat([prefix_pos, patch_pos]).expand(b, -1, -1)
    offsets = torch.zeros(b + 1, dtype=torch.int32, device=tokens.device)
    offsets[1:] = keep.sum(1).cumsum(0)
    return SparseCondition(tokens[keep], pos[keep].int(), offsets)
