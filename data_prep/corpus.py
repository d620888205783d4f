"""`python -m data_prep.corpus out=DIR n_procedural=8 seed=0 real=[pyvista,pymeshfix] max_faces=null` (Hydra;
d3ds2/configs/corpus.yaml): write a corpus of mesh files (d3ds2.geometry.corpus)."""
import sys

import hydra
from omegaconf import DictConfig

from d3ds2.geometry.corpus import write_corpus


@hydra.main(config_path="pkg://d3ds2.configs", config_name="corpus", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        paths = write_corpus(cfg.out, int(cfg.n_procedural), int(cfg.seed), tuple(cfg.real), cfg.max_faces)
    except ValueError as e:
        print(f"data_prep.corpus: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(paths)} meshes to {cfg.out}")


if __name__ == "__main__":
    main()
