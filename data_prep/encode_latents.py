"""`python -m data_prep.encode_latents data=DATA resolution=512 vae=logs/vae/RUN [features=precompute]` (Hydra).

Encodes the data shards of DATA (``shards/{train,val}-*.tar``) into latent shards for DiT training, once: per
sample, the sparse SDF at ``resolution`` -> the trained sparse SDF VAE's posterior mean on the occupied latent
cells; its views -> preprocessed 518^2 images (RGB on white + mask), stored as they are (``features=images``:
the DiT computes DINOv2 features on the fly) or encoded once by DINOv2 (``features=precompute``). One latent
shard per data shard, same name, under ``DATA/latents/R/``, with ``encoder.json`` (the VAE checkpoint and its
sha256) and ``stats.json`` (per-channel mean/std of the train latents). Names: d3ds2/data/layout.py.

Many GPUs: ``torchrun --nproc_per_node=8 -m data_prep.encode_latents ...`` (add --nnodes/--node_rank/--rdzv for
several machines): each rank encodes every world_size-th shard on its own GPU. Resumable: finished latent shards
(written atomically) are skipped, so a re-run does only what is left.
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
import torch
from omegaconf import DictConfig

from d3ds2.data.latent_shards import (check_encoder, latent_stats, write_json_atomic,
                                      write_latent_shard)
from d3ds2.data.layout import LATENT_ENCODER, LATENT_STATS, DataLayout, shard_urls
from d3ds2.hashing import file_sha256
from d3ds2.models.conditioner import ImageConditioner, preprocess_image
from d3ds2.sparse import SparseTensor

log = logging.getLogger("encode_latents")


def load_vae(run: str, device: torch.device):
    """The sparse SDF VAE of a training run, the SDF scale its data used (``data.sdf_scale``) and its checkpoint."""
    from d3ds2.pipeline import load_model, resolve_run

    cfg, ckpt = resolve_run(run)
    scale = cfg.get("data", {}).get("sdf_scale")
    return load_model(cfg.model.net, ckpt).to(device), (None if scale is None else float(scale)), str(ckpt)


@torch.no_grad()
def encode_sample(sample: dict, resolution: int, vae, sdf_scale: float, device, conditioner, features: str, max_views: int) -> dict:
    """Decoded data sample -> latent-shard sample (see d3ds2.data.latent_shards)."""
    from d3ds2.data.sdf_transforms import normalise_sdf
    from d3ds2.data.shard_format import sample_to_tensors

    t = sample_to_tensors(sample, resolution)
    keep = t["in_band"]
    x = SparseTensor.from_samples([normalise_sdf(t["sdf"][keep], sdf_scale)[:, None]], [t["coords"][keep]]).to(device)
    latent, _ = vae.encode(x, sample=False)
    out = {"key": sample["key"], "coords": latent.coords[:, 1:].cpu().numpy(), "feats": latent.feats.float().cpu().numpy(),
           "resolution": resolution}
    views = sample.get("views")
    if views is None or features == "none":
        return out
    images = torch.stack([preprocess_image(v) for v in views["rgba"][:max_views]])
    if features == "precompute":
        tokens = conditioner(images.to(device))
        out["tokens"] = tokens.half().cpu().numpy()
        out["fg"] = conditioner.patch_mask(images[:, 3:]).numpy()
    else:
        out["images"] = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    return out


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group when world > 1."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _input_shards(layout: DataLayout, splits) -> list[str]:
    hint = "write them with `python -m data_prep input=MESHES output=DATA` (docs/data_prep.md)"
    urls = []
    for split in splits:
        try:
            urls += shard_urls(layout.shards_dir, split, hint)
        except FileNotFoundError:
            if split == "train":
                raise
            log.warning("no %s shards in %s: only the other splits are encoded", split, layout.shards_dir)
    return urls


def run(cfg: DictConfig) -> dict:
    """Encode this rank's part of the data shards; rank 0 writes encoder.json first and stats.json last."""
    from tqdm import tqdm

    from d3ds2.data.shard_format import decode_sample
    from d3ds2.data.shards import read_tar

    rank, world, local = _distributed()
    device = torch.device(cfg.device if cfg.device != "auto" else (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    layout = DataLayout(str(cfg.data))
    resolution = int(cfg.resolution)
    out = str(cfg.out) if cfg.out else layout.latents_dir(resolution)
    stats_path, encoder_path = os.path.join(out, LATENT_STATS), os.path.join(out, LATENT_ENCODER)
    vae, scale, ckpt = load_vae(str(cfg.vae), device)
    scale = cfg.sdf_scale if cfg.sdf_scale is not None else scale
    if scale is None:
        raise ValueError(f"vae={cfg.vae}: its config has no data.sdf_scale; pass sdf_scale=")
    encoder = {"vae_run": str(cfg.vae), "vae_checkpoint": ckpt, "vae_sha256": file_sha256(ckpt),
               "resolution": resolution, "sdf_scale": float(scale), "features": str(cfg.features),
               "backbone": str(cfg.backbone) if cfg.features == "precompute" else None}
    if os.path.exists(encoder_path):  # resuming: the latents there must be this VAE's
        check_encoder(encoder_path, ckpt, f"the latents in {out}")
    _barrier(world)
    if rank == 0:
        write_json_atomic(encoder_path, encoder)
    shards = _input_shards(layout, list(cfg.splits))
    mine = shards[rank::world]
    todo = [p for p in mine if not os.path.exists(os.path.join(out, os.path.basename(p)))]
    conditioner = ImageConditioner(backbone=cfg.backbone).to(device) if cfg.features == "precompute" else None
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"encode_latents rank {rank}/{world}", unit="shard",
               disable=not cfg.progress, position=local)
    samples_done = 0
    for path in todo:
        samples = [encode_sample(decode_sample(raw), resolution, vae, float(scale), device, conditioner, cfg.features,
                                 cfg.max_views) for raw in read_tar(path)]
        write_latent_shard(os.path.join(out, os.path.basename(path)), samples)
        samples_done += len(samples)
        bar.update(1)
    bar.close()
    _barrier(world)
    summary = {"rank": rank, "world_size": world, "shards": len(mine), "encoded_now": len(todo),
               "samples_now": samples_done, "out": out}
    if rank == 0 and cfg.stats:
        stats = latent_stats(shard_urls(out, "train"))
        write_json_atomic(stats_path, {**stats, "vae_sha256": encoder["vae_sha256"]})
        summary["stats"] = stats_path
    _barrier(world)
    return summary


@hydra.main(config_path="pkg://d3ds2.configs.data_prep", config_name="encode_latents", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"encode_latents: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(summary)


if __name__ == "__main__":
    main()
