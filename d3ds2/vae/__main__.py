"""``python -m d3ds2.vae {encode,decode,reconstruct}``: use a trained sparse SDF VAE from the shell.

  encode MESH --ckpt CKPT [--resolution R] [-o latent.npz]      mesh -> latent file
  decode LATENT --ckpt CKPT [-o mesh.ply]                        latent file -> mesh
  reconstruct MESH --ckpt CKPT [--resolution R] [-o mesh.ply]    mesh -> mesh + metrics (JSON on stdout)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import decode_latent, encode_sample, load_latent, load_vae, mesh_to_sample, save_latent, save_mesh


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d3ds2.vae", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, arg in (("encode", "mesh"), ("decode", "latent"), ("reconstruct", "mesh")):
        s = sub.add_parser(name)
        s.add_argument(arg)
        s.add_argument("--ckpt", required=True, help="a training checkpoint (.ckpt)")
        s.add_argument("--config", default=None, help="the run's config_resolved.yaml (default: found next to --ckpt)")
        s.add_argument("-o", "--output", default=None)
        s.add_argument("--device", default="cpu")
        if arg == "mesh":
            s.add_argument("--resolution", type=int, default=None, help="fine grid R (default: the run's val_resolution)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    vae, cfg = load_vae(args.ckpt, args.config, args.device)
    sdf_scale = float(cfg.data.sdf_scale)
    if args.command == "decode":
        z, resolution, _ = load_latent(args.latent, args.device)
        mesh, _, _ = decode_latent(vae, z, resolution)
        out = args.output or str(Path(args.latent).with_suffix(".ply"))
        save_mesh(mesh, out)
        print(json.dumps({"mesh": out, "faces": len(mesh.faces), "vertices": len(mesh.vertices)}))
        return 0
    resolution = args.resolution or int(cfg.data.val_resolution)
    sample, ref = mesh_to_sample(args.mesh, resolution)
    z = encode_sample(vae, sample, sdf_scale)
    if args.command == "encode":
        out = args.output or str(Path(args.mesh).with_suffix(".latent.npz"))
        save_latent(out, z, resolution, sdf_scale, Path(args.mesh).stem)
        print(json.dumps({"latent": out, "latent_voxels": z.num_voxels, "channels": z.feats.shape[1]}))
        return 0
    mesh, _, _ = decode_latent(vae, z, resolution)
    out = args.output or str(Path(args.mesh).with_suffix(".recon.ply"))
    save_mesh(mesh, out)
    result = {"mesh": out, "resolution": resolution, "faces": len(mesh.faces)}
    if len(mesh.faces):
        from ..geometry.metrics import mesh_metrics

        result.update(mesh_metrics(mesh, ref, 50_000, (0.01, 0.02)))
    else:
        result["error"] = "the decoded SDF has no zero crossing (empty mesh): the model is undertrained"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
