"""`python -m data_prep input=... output=... resolutions=[256,512] views=45 workers=2` (Hydra; see docs/data_prep.md)."""
import json
import sys

import hydra
from omegaconf import DictConfig

from d3ds2.data.prep import OutputError, run


@hydra.main(config_path="pkg://d3ds2.configs.data_prep", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg, progress=cfg.progress)
    except (OutputError, FileNotFoundError, ValueError) as e:  # unwritable output, bad input / split_file
        print(f"data_prep: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
