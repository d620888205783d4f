"""Encode data shards (sparse SDF + renders) into latent shards for DiT training, once.

For every sample: the sparse SDF at ``--resolution`` -> the trained sparse SDF VAE's posterior mean on the
occupied latent cells; its views -> preprocessed 518^2 images (RGB on white + mask), stored as they are
(``--features images``: the DiT computes DINOv2 features on the fly) or encoded once by DINOv2
(``--features precompute``: dense tokens + foreground patch masks, so training never runs DINOv2).
One latent shard per data shard (d3ds2/training/dit_datamodule.py describes the format).

Usage: python data_prep/encode_latents.py --shards 'data/shards/train-*.tar' --out data/latents/512 \
    --resolution 512 --vae logs/vae/main [--features precompute --backbone facebook/dinov2-with-registers-large]
then:  python data_prep/latent_stats.py 'data/latents/512/train-*.tar' data/latents/512/stats.json
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from d3ds2.models.conditioner import ImageConditioner, preprocess_image
from d3ds2.sparse import SparseTensor
from d3ds2.training.dit_datamodule import expand_shards, write_latent_shard

log = logging.getLogger("encode_latents")


def load_vae(run: str, device: torch.device):
    """The sparse SDF VAE of a training run and the SDF scale its data used (``data.sdf_scale``)."""
    from d3ds2.pipeline import load_model, resolve_run

    cfg, ckpt = resolve_run(run)
    scale = cfg.get("data", {}).get("sdf_scale")
    if scale is None:
        raise ValueError(f"{run}: its config has no data.sdf_scale; pass --sdf-scale")
    return load_model(cfg.model.net, ckpt).to(device), float(scale)


@torch.no_grad()
def encode_sample(sample: dict, resolution: int, vae, sdf_scale: float, device, conditioner, features: str, max_views: int) -> dict:
    """Decoded data sample -> latent-shard sample (see write_latent_shard)."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="glob of data shards (data_prep output)")
    ap.add_argument("--out", required=True, help="output folder of latent shards")
    ap.add_argument("--resolution", type=int, required=True, help="fine SDF resolution (latent grid = resolution / 8)")
    ap.add_argument("--vae", required=True, help="training run directory of the sparse SDF VAE")
    ap.add_argument("--sdf-scale", type=float, default=None, help="override the VAE run's data.sdf_scale")
    ap.add_argument("--features", choices=["images", "precompute", "none"], default="images")
    ap.add_argument("--backbone", default="facebook/dinov2-with-registers-large", help="DINOv2 dir or hub id (precompute)")
    ap.add_argument("--max-views", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from d3ds2.data.shards import read_tar
    from d3ds2.data.shard_format import decode_sample

    device = torch.device(args.device)
    vae, scale = load_vae(args.vae, device)
    scale = args.sdf_scale or scale
    conditioner = ImageConditioner(backbone=args.backbone).to(device) if args.features == "precompute" else None
    out_dir = Path(args.out)
    for path in expand_shards(args.shards, hint="run python -m data_prep first (docs/data_prep.md)"):
        target = out_dir / Path(path).name
        if target.exists():
            log.info("%s exists, skipped", target)
            continue
        samples = [encode_sample(decode_sample(raw), args.resolution, vae, scale, device, conditioner, args.features, args.max_views)
                   for raw in read_tar(path)]
        write_latent_shard(target, samples)
        log.info("%s: %d samples, %d latent tokens", target, len(samples), sum(len(s["coords"]) for s in samples))


if __name__ == "__main__":
    main()
