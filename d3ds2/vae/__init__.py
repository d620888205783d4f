"""Use a trained sparse SDF VAE: mesh -> latent file, latent -> mesh, mesh -> reconstruction + metrics.

The CLI (``python -m d3ds2.vae command=...``, Hydra) is a thin wrapper over these functions. A checkpoint is read with the
model config saved by training next to it (``<run>/config_resolved.yaml``); EMA weights are preferred.
Latent files (.npz): ``coords`` [M, 3] int32 latent cells, ``feats`` [M, 16] float32, ``resolution`` (fine
grid R), ``sdf_scale`` (voxels mapped to 1), ``name``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.sdf_transforms import SDFSample, collate
from ..models.sparse_sdf_vae import SparseSDFVAE
from ..sparse import SparseTensor


def find_run_config(ckpt: str | os.PathLike) -> Path:
    """The ``config_resolved.yaml`` of the run a checkpoint belongs to (its folder or the one above)."""
    ckpt = Path(ckpt)
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "config_resolved.yaml").is_file():
            return d / "config_resolved.yaml"
    raise FileNotFoundError(
        f"no config_resolved.yaml next to {ckpt} or in its parent; pass config=RUN/config_resolved.yaml"
    )


def load_vae(ckpt: str | os.PathLike, config: str | os.PathLike | None = None, device: str = "cpu"):
    """(SparseSDFVAE with the checkpoint's weights (EMA preferred), its run config)."""
    import hydra
    from omegaconf import OmegaConf

    from ..checkpoint import load_net_weights

    cfg = OmegaConf.load(config or find_run_config(ckpt))
    net = hydra.utils.instantiate(cfg.model.net)
    if not isinstance(net, SparseSDFVAE):
        raise ValueError(f"{ckpt}: the run config builds {type(net).__name__}, not a SparseSDFVAE")
    load_net_weights(ckpt, net, prefer_ema=True)
    return net.to(device).eval(), cfg


def mesh_to_sample(path: str, resolution: int, band: float = 4.0, trunc: float = 7.9375):
    """(SDFSample at ``resolution``, reference surface of the normalised mesh) with the data-prep pipeline
    (normalise, watertight, sparse SDF, sharp edges), so inference sees exactly what training saw."""
    from omegaconf import OmegaConf

    from ..data.mesh_sample import build_sample

    from ..geometry.mesh_io import load_mesh
    from ..geometry.normalize import clean_mesh, normalise_mesh
    from ..geometry.watertight import reference_surface

    root = Path(__file__).resolve().parents[1] / "configs" / "data_prep" / "config.yaml"
    cfg = OmegaConf.load(root)
    cfg.input, cfg.output = path, ""
    cfg.resolutions, cfg.views = [resolution], 0
    cfg.sdf.band, cfg.sdf.trunc = band, trunc
    sample, _ = build_sample(path, cfg)
    from ..data.sdf_transforms import sample_at_resolution

    mesh, _ = normalise_mesh(clean_mesh(load_mesh(path)), cfg.extent)
    return sample_at_resolution(sample, resolution), reference_surface(mesh, cfg.watertight.resolution,
                                                                    cfg.watertight.decisive, cfg.sdf.backend)


@torch.no_grad()
def encode_sample(vae: SparseSDFVAE, sample: SDFSample, sdf_scale: float, sample_posterior: bool = False):
    """-> latent SparseTensor [M, C] (posterior mean unless ``sample_posterior``)."""
    batch = collate([sample], sdf_scale).to(next(vae.parameters()).device)
    z, _ = vae.encode(batch.inputs, sample=sample_posterior)
    return z


@torch.no_grad()
def decode_latent(vae: SparseSDFVAE, z: SparseTensor, resolution: int):
    """-> (mesh in the [-1, 1] frame, decoded coords [N, 3], sdf [N] normalised)."""
    from ..geometry.marching_cubes import sparse_marching_cubes

    out = vae.decode(z)
    feats, coords = out.sdf.sample(0)
    return sparse_marching_cubes(coords, feats[:, 0], resolution), coords, feats[:, 0]


def save_latent(path: str | os.PathLike, z: SparseTensor, resolution: int, sdf_scale: float, name: str = "") -> None:
    """Write a latent .npz atomically."""
    feats, coords = z.sample(0)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, coords=coords.cpu().numpy().astype(np.int32), feats=feats.float().cpu().numpy(),
                        resolution=np.int32(resolution), sdf_scale=np.float32(sdf_scale), name=np.str_(name))
    tmp.replace(path)


def load_latent(path: str | os.PathLike, device: str = "cpu") -> tuple[SparseTensor, int, float]:
    """-> (latent SparseTensor, fine resolution, sdf_scale)."""
    z = np.load(path)
    missing = {"coords", "feats", "resolution"} - set(z.files)
    if missing:
        raise ValueError(f"{path} is not a VAE latent file: missing {sorted(missing)}")
    coords = torch.from_numpy(z["coords"]).int()
    st = SparseTensor.from_samples([torch.from_numpy(z["feats"]).float()], [coords])
    return st.to(device), int(z["resolution"]), float(z["sdf_scale"]) if "sdf_scale" in z.files else 8.0


def save_mesh(mesh, path: str | os.PathLike) -> None:
    """Export a mesh (format from the suffix) through a temp file + rename."""
    path = Path(path)
    tmp = path.with_name(".tmp_" + path.name)
    mesh.export(tmp)
    tmp.replace(path)
