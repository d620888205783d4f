"""Generate the meshes an evaluation scores (one sweep point): images -> meshes named after the images, with a
record of the checkpoints (file name + sha256) and sampler settings that made them."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..hashing import file_sha256
from .alignment.scoring import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
ROLES = ("index_dit", "index_vae", "sparse_dit_512", "vae_512", "sparse_dit_1024", "vae_1024")


def checkpoint_file(spec: str | Path) -> Path:
    """A run directory -> its ``checkpoints/last.ckpt``; a file -> itself (see :func:`d3ds2.pipeline.resolve_run`)."""
    p = Path(spec)
    return p / "checkpoints" / "last.ckpt" if p.is_dir() else p


def checkpoint_records(ckpt: dict) -> dict[str, dict]:
    """role -> {"path", "file", "sha256"} for every checkpoint given in ``ckpt`` (a missing file: sha256 None)."""
    out = {}
    for role in ROLES:
        spec = ckpt.get(role)
        if spec is None:
            continue
        f = checkpoint_file(spec)
        out[role] = {"path": str(spec), "file": f.name, "sha256": file_sha256(f) if f.is_file() else None}
    return out


def list_images(image_dir: str | Path) -> list[Path]:
    """The images directly in ``image_dir`` (sorted); raises if there are none."""
    d = Path(image_dir)
    images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if d.is_dir() else []
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return images


def stage_settings(gen: Any) -> dict[str, dict]:
    """The sampler settings of every stage, ``gen.steps`` / ``gen.guidance`` (when set) overriding all stages."""
    out = {}
    for stage in ("dense", "sparse_512", "sparse_1024"):
        s = dict(gen[stage])
        if gen.get("steps") is not None:
            s["steps"] = int(gen.steps)
        if gen.get("guidance") is not None:
            s["guidance"] = float(gen.guidance)
        out[stage] = s
    return out


def generate_meshes(gen: Any, images: list[Path], out_dir: str | Path) -> tuple[list[Path], list[dict]]:
    """Run :class:`~d3ds2.pipeline.ImageTo3DPipeline` (from ``gen.ckpt`` runs) over ``images`` in batches of
    ``gen.batch_size``; each mesh is written as ``out_dir/<image stem>.glb``. Returns (written meshes, failure
    rows ``{"name", "error"}`` for images whose batch crashed). Loading errors (a missing checkpoint) raise."""
    import torch

    from ..pipeline import ImageTo3DPipeline, StageSampling

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = gen.device if gen.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    c = gen.ckpt
    pipe = ImageTo3DPipeline.from_runs(
        c.index_dit, c.sparse_dit_512, c.vae_512, index_vae=c.index_vae, sparse_dit_1024=c.sparse_dit_1024,
        vae_1024=c.vae_1024, backbone=gen.backbone, device=device, index_threshold=gen.index_threshold,
        mc_level=gen.mc_level, surface_band=gen.surface_band)
    stages = {k: StageSampling(**{**v, "guidance_interval": v.get("guidance_interval")})
              for k, v in stage_settings(gen).items()}
    written, failures = [], []
    for start in range(0, len(images), gen.batch_size):
        batch = images[start:start + gen.batch_size]
        try:
            meshes = pipe(batch, resolution=gen.resolution, seed=gen.seed, simplify=gen.simplify, **stages)
        except Exception as err:  # a crashing batch fails its images, the rest goes on
            log.warning("generation failed for %s: %s", [p.stem for p in batch], err)
            failures += [{"name": p.stem, "error": f"generation failed: {type(err).__name__}: {err}"} for p in batch]
            continue
        for image, mesh in zip(batch, meshes):
            path = out_dir / f"{image.stem}.glb"
            try:
                mesh.export(path)
                written.append(path)
            except Exception as err:  # e.g. an empty mesh
                failures.append({"name": image.stem, "error": f"export failed: {type(err).__name__}: {err}"})
    return written, failures
