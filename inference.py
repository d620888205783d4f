"""Image -> mesh: ``python inference.py image=PATH ckpt.index_dit=RUN ckpt.sparse_dit_512=RUN ckpt.vae_512=RUN out=mesh.glb``.

Settings in configs/inference.yaml; the logic lives in d3ds2.pipeline.
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


def output_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(n)]


@hydra.main(version_base="1.3", config_path="configs", config_name="inference")
def main(cfg: DictConfig) -> None:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    images = image_list(cfg.image)
    pipe = ImageTo3DPipeline.from_runs(
        cfg.ckpt.index_dit, cfg.ckpt.sparse_dit_512, cfg.ckpt.vae_512, index_vae=cfg.ckpt.index_vae,
        sparse_dit_1024=cfg.ckpt.sparse_dit_1024, vae_1024=cfg.ckpt.vae_1024, backbone=cfg.backbone, device=device,
        offload=cfg.offload, index_threshold=cfg.index_threshold, mc_level=cfg.mc_level, surface_band=cfg.surface_band,
        mesh_workers=cfg.mesh_workers,
    )
    meshes = pipe(images, resolution=cfg.resolution, seed=cfg.seed, dense=StageSampling(**cfg.dense),
                  sparse_512=StageSampling(**cfg.sparse_512), sparse_1024=StageSampling(**cfg.sparse_1024), simplify=cfg.simplify)
    for mesh, path in zip(meshes, output_paths(cfg.out, len(meshes))):
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
