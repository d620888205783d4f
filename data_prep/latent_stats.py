"""`python -m data_prep.latent_stats data=DATA resolution=512` (Hydra): per-channel mean/std of the train latents
(for the DiT's latent normalisation) -> DATA/latents/R/stats.json. ``encode_latents`` writes the same file at its
end; this entry point recomputes it (``shards=`` and ``out=`` read and write elsewhere)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from d3ds2.data.latent_shards import latent_shard_urls, latent_stats, write_json_atomic
from d3ds2.data.layout import DataLayout


@hydra.main(config_path="pkg://d3ds2.configs.data_prep", config_name="latent_stats", version_base=None)
def main(cfg: DictConfig) -> None:
    layout = DataLayout(str(cfg.data)) if cfg.data else None
    if layout is None and (cfg.shards is None or cfg.out is None):
        sys.exit("latent_stats: error: give data=DATA resolution=R, or shards=... out=...")
    try:
        urls = latent_shard_urls(cfg.shards if cfg.shards is not None else layout.latents_dir(cfg.resolution), cfg.split)
        stats = latent_stats(urls)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"latent_stats: error: {e}")
    out = str(cfg.out) if cfg.out is not None else layout.latent_stats(cfg.resolution)
    write_json_atomic(out, stats)
    print(f"{stats['samples']} samples, {stats['tokens']} tokens -> {out}")


if __name__ == "__main__":
    main()
