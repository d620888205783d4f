"""``python -m d3ds2.export_weights ckpt=RUN/checkpoints/last.ckpt``: trained weights as ``.safetensors`` (no
pickle), loadable wherever a ``.ckpt`` is (inference runs, ``init_from``, ``vae_ckpt``, ``d3ds2.vae --ckpt``)."""
import hydra
from omegaconf import DictConfig

from d3ds2.checkpoint import export_safetensors


@hydra.main(version_base="1.3", config_path="pkg://d3ds2.configs", config_name="export_weights")
def main(cfg: DictConfig) -> None:
    out = export_safetensors(cfg.ckpt, cfg.out, prefer_ema=cfg.ema)
    print(out)


if __name__ == "__main__":
    main()
