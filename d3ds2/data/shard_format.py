"""The one module that spells the shard keys: sample dict <-> webdataset dict, and sample -> model tensors.

Decoded sample (what `decode_sample` returns and `encode_sample` takes):
  key    str
  sdf    {R: {"cells": int32 [M,3], "sdf": float32 [M,8,8,8] voxel units, "sharp": bool [M,8,8,8],
              "band": float, "trunc": float}}
  views  {"rgba": uint8 [V,H,W,4], "intrinsics": float32 [V,3,3], "extrinsics": float32 [V,4,4] (world->camera,
          OpenCV), "elevation", "azimuth", "focal_mm", "sensor_mm": float32 [V]}   (optional)
  meta   dict (JSON)
Webdataset entries: `sdf{R}.npz` (cells int16, sdf int8 in steps of 1/16 voxel, sharp bit-packed [M,64] uint8),
`view{i:03d}.png` (RGBA PNG: RGB on white + alpha mask), `cameras.npz`, `meta.json`.
"""
from __future__ import annotations

import io
import json

import numpy as np

SDF_STEP = 1.0 / 16.0  # voxel units per int8 step
SDF_TRUNC = 127 * SDF_STEP  # largest storable |sdf| (7.9375 voxels)
CAMERA_FIELDS = ("intrinsics", "extrinsics", "elevation", "azimuth", "focal_mm", "sensor_mm")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def encode_png(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="png", compress_level=1)
    return buf.getvalue()


def quantise_sdf(sdf: np.ndarray) -> np.ndarray:
    """float voxel units -> int8 steps of SDF_STEP (clamped to +-SDF_TRUNC)."""
    return np.clip(np.rint(np.asarray(sdf) / SDF_STEP), -127, 127).astype(np.int8)


def dequantise_sdf(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * SDF_STEP


def sdf_key(resolution: int) -> str:
    return f"sdf{resolution}.npz"


def stored_resolutions(raw: dict) -> list[int]:
    """Resolutions present in a webdataset dict (its `sdf{R}.npz` entries)."""
    return sorted(int(k[3:-4]) for k in raw if k.startswith("sdf") and k.endswith(".npz"))


def encode_sample(sample: dict) -> dict:
    """Decoded sample -> webdataset dict of bytes."""
    out = {"__key__": sample["key"], "meta.json": json.dumps(sample.get("meta", {})).encode()}
    for R, s in sample["sdf"].items():
        cells = np.asarray(s["cells"])
        if cells.size and cells.max() >= 2**15:
            raise ValueError(f"cell coords up to {cells.max()} do not fit int16")
        sharp = np.asarray(s["sharp"], bool).reshape(len(cells), -1)
        out[sdf_key(int(R))] = _npz(cells=cells.astype(np.int16), sdf=quantise_sdf(s["sdf"]),
                                    sharp=np.packbits(sharp, axis=1), band=np.float32(s["band"]),
                                    trunc=np.float32(min(s["trunc"], SDF_TRUNC)))
    views = sample.get("views")
    if views is not None:
        for i, rgba in enumerate(views["rgba"]):
            out[f"view{i:03d}.png"] = encode_png(np.asarray(rgba, np.uint8))
        out["cameras.npz"] = _npz(**{k: np.asarray(views[k], np.float32) for k in CAMERA_FIELDS})
    return out


def decode_sample(raw: dict, resolutions=None, with_views: bool = True) -> dict:
    """Webdataset dict (bytes values) -> decoded sample; `resolutions` limits which SDFs are decoded."""
    sample = {"key": raw["__key__"], "meta": json.loads(raw["meta.json"]), "sdf": {}}
    for R in stored_resolutions(raw):
        if resolutions is not None and R not in resolutions:
            continue
        z = np.load(io.BytesIO(raw[sdf_key(R)]))
        M = len(z["cells"])
        sharp = np.unpackbits(z["sharp"], axis=1, count=512).astype(bool).reshape(M, 8, 8, 8)
        sample["sdf"][R] = {"cells": z["cells"].astype(np.int32), "sdf": dequantise_sdf(z["sdf"]),
                            "sharp": sharp, "band": float(z["band"]), "trunc": float(z["trunc"])}
    if with_views and "cameras.npz" in raw:
        from PIL import Image

        names = sorted(k for k in raw if k.startswith("view") and k.endswith(".png"))
        cams = np.load(io.BytesIO(raw["cameras.npz"]))
        sample["views"] = {k: cams[k] for k in CAMERA_FIELDS}
        sample["views"]["rgba"] = np.stack([np.asarray(Image.open(io.BytesIO(raw[n])).convert("RGBA"))
                                            for n in names])
    return sample


def sample_to_tensors(sample: dict, resolution: int) -> dict:
    """Decoded sample -> {coords [N,3] int32, sdf [N] float32 voxel units, in_band [N] bool, sharp [N] bool}.

    N covers every voxel of the occupied 8^3 cells (the decoder's output set, L_ext); `in_band` marks the
    encoder input voxels (|sdf| < band), `sharp` the voxels near sharp edges. A resolution that is not stored
    is trilinearly resampled from the nearest stored higher one (else the highest stored).
    """
    import torch

    from d3ds2.geometry.sparse_sdf import SparseSDF, cell_voxel_coords, resample_sparse_sdf, voxel_centres

    stored = sorted(sample["sdf"])
    if not stored:
        raise ValueError(f"sample {sample.get('key')} holds no SDF")
    if resolution in sample["sdf"]:
        s = sample["sdf"][resolution]
        cells, sdf, sharp, band = s["cells"], s["sdf"], s["sharp"], s["band"]
    else:
        higher = [R for R in stored if R > resolution]
        R0 = higher[0] if higher else stored[-1]
        s = sample["sdf"][R0]
        src = SparseSDF(R0, s["cells"], s["sdf"], s["band"], s["trunc"])
        dst = resample_sparse_sdf(src, resolution)
        cells, sdf, band = dst.cells, dst.sdf, dst.band
        sharp = np.zeros(sdf.shape, bool)
        sharp_src = voxel_centres(cell_voxel_coords(src.cells)[s["sharp"].reshape(-1)], R0)
        if len(sharp_src) and len(cells):  # a target voxel is sharp if it contains a sharp source voxel centre
            from d3ds2.geometry.sharp_edges import sharp_voxel_mask

            sharp = sharp_voxel_mask(dst, sharp_src, radius=0.87)
    coords = cell_voxel_coords(cells)
    sdf = np.asarray(sdf, np.float32).reshape(-1)
    return {"coords": torch.from_numpy(coords), "sdf": torch.from_numpy(sdf),
            "in_band": torch.from_numpy(np.abs(sdf) < band), "sharp": torch.from_numpy(np.asarray(sharp).reshape(-1))}
