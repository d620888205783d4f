"""Image -> mesh: ``python inference.py image=PATH ckpt.index_dit=RUN ckpt.sparse_dit_512=RUN ckpt.vae_512=RUN out=mesh.glb``,
or from a released Direct3D-S2 folder: ``python inference.py pretrained=DIR image=photo.png out=mesh.glb``.

Settings in d3ds2/configs/inference.yaml; the logic lives in d3ds2.pipeline.
"""
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from d3ds2.pipeline import ImageTo3DPipeline, StageSampling

log = logging.getLogger("inference")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_list(spec: str) -> list[Path]:
    paths = []
    for part in str(spec).split(","):
        p = Path(part)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image={part}: no such file or directory")
    if not paths:
        raise FileNotFoundError(f"image={spec}: no images found")
    return paths


def output_paths(out: str, images: list[Path], from_folder: bool) -> list[Path]:
    """One mesh path per image: ``out`` for a single image; for a folder of images, ``out`` is a folder (or its
    parent when ``out`` has a mesh suffix) and each mesh is named after its image's stem (so evaluate.py pairs
    them); a list of files gets index suffixes."""
    out = Path(out)
    if len(images) == 1 and not from_folder:
        return [out]
    if from_folder:
        folder, suffix = (out.parent, out.suffix) if out.suffix else (out, ".glb")
        return [folder / f"{p.stem}{suffix}" for p in images]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(len(images))]


def build_pipeline(cfg: DictConfig, device: str) -> ImageTo3DPipeline:
    matting = None
    if cfg.matting:
        from d3ds2.matting import load_matting

        matting = load_matting(cfg.matting, device)
    common = dict(device=device, offload=cfg.offload, mesh_workers=cfg.mesh_workers, matting=matting,
                  remove_interior=cfg.remove_interior, grid_device=cfg.grid_device, surface_band=cfg.surface_band,
                  index_threshold=cfg.index_threshold)
    for key in ("mc_level", "cells_from", "weights_dtype"):
        if cfg[key] is not None:
            common[key] = cfg[key]
    if cfg.pretrained:
        pipe = ImageTo3DPipeline.from_pretrained(cfg.pretrained, backbone=cfg.backbone, **common)
    else:
        pipe = ImageTo3DPipeline.from_runs(
            cfg.ckpt.index_dit, cfg.ckpt.sparse_dit_512, cfg.ckpt.vae_512, index_vae=cfg.ckpt.index_vae,
            sparse_dit_1024=cfg.ckpt.sparse_dit_1024, vae_1024=cfg.ckpt.vae_1024, backbone=cfg.backbone, **common)
    if cfg.decode_chunk is not None:  # latent cells per chunk of the VAE decode (bounds its peak memory)
        for stage in (pipe.stage_512, pipe.stage_1024):
            if stage is not None:
                stage.vae.chunk_size = cfg.decode_chunk or None
    return pipe


@hydra.main(version_base="1.3", config_path="pkg://d3ds2.configs", config_name="inference")
def main(cfg: DictConfig) -> None:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    images = image_list(cfg.image)
    if not cfg.pretrained and (cfg.ckpt.index_dit is None or cfg.ckpt.sparse_dit_512 is None or cfg.ckpt.vae_512 is None):
        raise SystemExit("give pretrained=RELEASE_DIR (a Direct3D-S2 release folder) or ckpt.index_dit, "
                         "ckpt.sparse_dit_512 and ckpt.vae_512 (training runs)")
    pipe = build_pipeline(cfg, device)
    meshes = pipe(images, resolution=cfg.resolution, seed=cfg.seed, dense=StageSampling(**cfg.dense),
                  sparse_512=StageSampling(**cfg.sparse_512), sparse_1024=StageSampling(**cfg.sparse_1024), simplify=cfg.simplify)
    for mesh, path in zip(meshes, output_paths(cfg.out, images, any(Path(p).is_dir() for p in str(cfg.image).split(",")))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        mesh.export(tmp)
        tmp.replace(path)
        print(f"{path}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces")
    for r in pipe.reports:
        mem = f"{r.peak_gib:.2f} GiB" if r.peak_gib is not None else "-"
        print(f"  {r.name:<16} {r.seconds:8.2f} s  peak {mem}  {r.info}")


if __name__ == "__main__":
    main()
