"""Train any d3ds2 model from a Hydra experiment: ``python train.py experiment=vae_multires``.

Everything is configured in d3ds2/configs/ (see d3ds2/configs/train.yaml); the logic lives in d3ds2.training.runner.
"""
import hydra
from omegaconf import DictConfig

from d3ds2.training.runner import run_training


@hydra.main(version_base="1.3", config_path="pkg://d3ds2.configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_training(cfg)


if __name__ == "__main__":
    main()
