"""``python -m d3ds2.vae command=encode|decode|reconstruct input=PATH ckpt=CKPT [out=PATH] [resolution=R]`` (Hydra;
d3ds2/configs/vae_tools.yaml): use a trained sparse SDF VAE from the shell. Prints one JSON line.

  command=encode input=MESH       mesh -> latent file (.latent.npz)
  command=decode input=LATENT     latent file -> mesh (.ply)
  command=reconstruct input=MESH  mesh -> mesh (.recon.ply) + metrics
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import decode_latent, encode_sample, load_latent, load_vae, mesh_to_sample, save_latent, save_mesh

COMMANDS = ("encode", "decode", "reconstruct")


def run(cfg: DictConfig) -> dict:
    """Run ``cfg.command`` (keys of d3ds2/configs/vae_tools.yaml); returns what the CLI prints."""
    if cfg.command not in COMMANDS:
        raise ValueError(f"command={cfg.command}: expected one of {COMMANDS}")
    vae, run_cfg = load_vae(cfg.ckpt, cfg.config, cfg.device)
    sdf_scale = float(run_cfg.data.sdf_scale)
    if cfg.command == "decode":
        z, resolution, _ = load_latent(cfg.input, cfg.device)
        mesh, _, _ = decode_latent(vae, z, resolution)
        out = cfg.out or str(Path(cfg.input).with_suffix(".ply"))
        save_mesh(mesh, out)
        return {"mesh": out, "faces": len(mesh.faces), "vertices": len(mesh.vertices)}
    resolution = cfg.resolution or int(run_cfg.data.val_resolution)
    sample, ref = mesh_to_sample(cfg.input, resolution)
    z = encode_sample(vae, sample, sdf_scale)
    if cfg.command == "encode":
        out = cfg.out or str(Path(cfg.input).with_suffix(".latent.npz"))
        save_latent(out, z, resolution, sdf_scale, Path(cfg.input).stem)
        return {"latent": out, "latent_voxels": z.num_voxels, "channels": z.feats.shape[1]}
    mesh, _, _ = decode_latent(vae, z, resolution)
    out = cfg.out or str(Path(cfg.input).with_suffix(".recon.ply"))
    save_mesh(mesh, out)
    result = {"mesh": out, "resolution": resolution, "faces": len(mesh.faces)}
    if len(mesh.faces):
        from ..geometry.metrics import mesh_metrics

        result.update(mesh_metrics(mesh, ref, 50_000, (0.01, 0.02)))
    else:
        result["error"] = "the decoded SDF has no zero crossing (empty mesh): the model is undertrained"
    return result


@hydra.main(config_path="pkg://d3ds2.configs", config_name="vae_tools", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        print(json.dumps(run(cfg)))
    except (ValueError, FileNotFoundError) as e:
        print(f"d3ds2.vae: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
