"""The ``config.yaml`` of a released Direct3D-S2 snapshot: read it, check it, build d3ds2 models from it.

A release folder (HF ``wushuang98/Direct3D-S2``, subfolder ``direct3d-s2-v-1-1`` or ``direct3d-s2-v-1-0``)
holds ``config.yaml`` with one ``{target, params}`` section per model (``dense_vae``, ``dense_dit``,
``sparse_vae_512``, ``sparse_dit_512``, ``sparse_vae_1024``, ``sparse_dit_1024``, ``refiner``,
``refiner_1024``, schedulers and image encoders). :func:`build_model` maps the official ``params`` onto the
d3ds2 classes; :func:`release_config` writes the official values back (export, tests).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

MODEL_SECTIONS = ("dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512", "sparse_vae_1024", "sparse_dit_1024",
                  "refiner", "refiner_1024")
SCHEDULER_SECTIONS = ("dense_scheduler", "sparse_scheduler_512", "sparse_scheduler_1024")
CONFIG_SECTIONS = MODEL_SECTIONS + SCHEDULER_SECTIONS + ("dense_image_encoder", "sparse_image_encoder")

_TARGETS = {
    "dense_vae": "direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE",
    "dense_dit": "direct3d_s2.models.transformers.dense_dit.DenseDiT",
    "sparse_vae": "direct3d_s2.models.autoencoders.ss_vae.SparseSDFVAE",
    "sparse_dit": "direct3d_s2.models.transformers.sparse_dit.SparseDiT",
    "refiner": "direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL",
    "refiner_1024": "direct3d_s2.models.refiner.unet_refiner.Voxel_RefinerXL_sign",
    "scheduler": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
    "encoder": "direct3d_s2.models.conditioner.DinoEncoder",
}


class ReleaseConfigError(ValueError):
    """A config.yaml that does not describe a Direct3D-S2 release d3ds2 can build."""


def kind_of(section: str) -> str:
    """Model kind of a config section: dense_vae | dense_dit | sparse_vae | sparse_dit | refiner | refiner_1024."""
    if section.startswith("sparse_vae"):
        return "sparse_vae"
    if section.startswith("sparse_dit"):
        return "sparse_dit"
    return section


def _sparse_dit_params(version: str, resolution: int) -> dict:
    v10 = version == "v1.0"
    return dict(resolution=resolution, in_channels=16, out_channels=16, model_channels=1024, cond_channels=1024,
                num_blocks=24, num_heads=32, num_kv_heads=2, compression_block_size=4 if v10 else 8,
                selection_block_size=8, topk=32 if v10 and resolution == 64 else 8,
                compression_version="v2" if v10 else "v1", pe_mode="ape", factor=1.0 if resolution == 64 else 0.5,
                sparse_conditions=v10, qk_rms_norm=True, use_shift=True, use_checkpoint=True, use_fp16=True)


def _sparse_vae_params(resolution: int) -> dict:
    p = dict(use_checkpoint=True, embed_dim=16, num_head_channels_encoder=64, model_channels_encoder=512,
             num_heads_encoder=8, num_blocks_encoder=4, num_head_channels_decoder=64, model_channels_decoder=512,
             num_heads_decoder=8, num_blocks_decoder=4, resolution=resolution, out_channels=1, use_fp16=True,
             latents_scale=1.0, latents_shift=0.0)
    if resolution == 128:
        p["chunk_size"] = 4
    return p


def release_config(version: str = "v1.1") -> dict:
    """The official config.yaml of a release ('v1.1' or 'v1.0') as a dict (values of the design digest §2-§5)."""
    if version not in ("v1.0", "v1.1"):
        raise ValueError(f"release version must be 'v1.0' or 'v1.1', got {version!r}")
    encoder = dict(target=_TARGETS["encoder"], params=dict(model="facebookresearch/dinov2", version="dinov2_vitl14_reg", size=518))
    refiner = dict(in_channels=1, out_channels=1, layers_per_block=2, layers_mid_block=2, use_fp16=True)

    def sched(shift: float) -> dict:
        return dict(target=_TARGETS["scheduler"], params=dict(num_train_timesteps=1000, shift=shift))

    return {
        "dense_vae": dict(target=_TARGETS["dense_vae"], params=dict(
            use_checkpoint=True, embed_dim=8, in_channels=1, out_channels=1, model_channels_encoder=[32, 128, 512],
            num_res_blocks_encoder=2, num_res_blocks_middle_encoder=2, model_channels_decoder=[512, 128, 64],
            num_res_blocks_decoder=4, num_res_blocks_middle_decoder=4, use_fp16=True, latents_scale=1.0, latents_shift=0.0)),
        "dense_dit": dict(target=_TARGETS["dense_dit"], params=dict(
            resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
            num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, use_checkpoint=True, use_fp16=True,
            latent_shape=[8, 16, 16, 16])),
        "dense_image_encoder": copy.deepcopy(encoder),
        "dense_scheduler": sched(6.0),
        "sparse_vae_512": dict(target=_TARGETS["sparse_vae"], params=_sparse_vae_params(64)),
        "sparse_dit_512": dict(target=_TARGETS["sparse_dit"], params=_sparse_dit_params(version, 64)),
        "sparse_scheduler_512": sched(6.0),
        "sparse_vae_1024": dict(target=_TARGETS["sparse_vae"], params=_sparse_vae_params(128)),
        "sparse_dit_1024": dict(target=_TARGETS["sparse_dit"], params=_sparse_dit_params(version, 128)),
        "sparse_scheduler_1024": sched(8.0),
        "sparse_image_encoder": copy.deepcopy(encoder),
        "refiner": dict(target=_TARGETS["refiner"], params=dict(refiner, patch_size=192)),
        "refiner_1024": dict(target=_TARGETS["refiner_1024"], params=dict(refiner, patch_size=256)),
    }


@dataclass
class ReleaseConfig:
    """A parsed config.yaml: ``sections`` (name -> {target, params}) and the release ``version`` it describes."""

    path: Path
    sections: dict

    @property
    def version(self) -> str:
        """'v1.0' (sparse conditions, compression v2) or 'v1.1'."""
        p = self.params("sparse_dit_512")
        return "v1.0" if p.get("sparse_conditions") or p.get("compression_version") == "v2" else "v1.1"

    def params(self, section: str) -> dict:
        return dict(self.sections[section].get("params") or {})

    def scheduler_shift(self, section: str) -> float:
        return float(self.params(section).get("shift", 1.0))

    @property
    def use_fp16(self) -> bool:
        return bool(self.params("sparse_dit_512").get("use_fp16", False))


def read_release_config(path: str | Path) -> ReleaseConfig:
    """Parse ``config.yaml`` (the file or its folder) and check that every model section is there."""
    from omegaconf import OmegaConf

    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.yaml; a Direct3D-S2 release folder holds config.yaml and the five "
                                "model_*.ckpt files (download the whole subfolder direct3d-s2-v-1-1 of wushuang98/Direct3D-S2)")
    try:
        sections = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - any YAML/OmegaConf failure is reported with the file
        raise ReleaseConfigError(f"{path}: not a readable YAML file ({e}); re-download config.yaml of the release") from e
    if not isinstance(sections, dict):
        raise ReleaseConfigError(f"{path}: expected a mapping of model sections, got {type(sections).__name__}")
    missing = [s for s in MODEL_SECTIONS if not isinstance(sections.get(s), dict) or "params" not in sections[s]]
    if missing:
        raise ReleaseConfigError(f"{path}: sections {missing} (each with target/params) are missing; this is not the "
                                 "config.yaml of a Direct3D-S2 release (expected keys: " + ", ".join(CONFIG_SECTIONS) + ")")
    return ReleaseConfig(path, sections)


def _need(params: dict, section: str, key: str, path):
    if key not in params:
        raise ReleaseConfigError(f"{path}: {section}.params.{key} is missing")
    return params[key]


def build_model(cfg: ReleaseConfig, section: str) -> nn.Module:
    """The d3ds2 model of ``section`` with the official hyper-parameters of ``cfg`` (float32, random init)."""
    from ..models.dense_dit import DenseDiT
    from ..models.dense_vae import DenseShapeVAE
    from ..models.refiner import UNET_CHANNELS, SignRefiner, VoxelRefiner
    from ..models.sparse_dit import SparseDiT
    from ..models.sparse_sdf_vae import SparseSDFVAE

    p, kind, path = cfg.params(section), kind_of(section), cfg.path

    def need(key):
        return _need(p, section, key, path)

    if kind == "dense_vae":
        if p.get("in_channels", 1) != 1 or p.get("out_channels", 1) != 1:
            raise ReleaseConfigError(f"{path}: dense_vae must have in/out_channels 1")
        return DenseShapeVAE(need("embed_dim"), tuple(need("model_channels_encoder")), tuple(need("model_channels_decoder")),
                             need("num_res_blocks_encoder"), need("num_res_blocks_decoder"),
                             need("num_res_blocks_middle_encoder"), need("num_res_blocks_middle_decoder"))
    if kind == "dense_dit":
        if p.get("patch_size", 1) != 1:
            raise ReleaseConfigError(f"{path}: dense_dit.patch_size {p['patch_size']} is not supported (official: 1)")
        return DenseDiT(need("resolution"), need("in_channels"), need("model_channels"), need("cond_channels"),
                        need("num_blocks"), need("num_heads"), float(p.get("mlp_ratio", 4)), bool(p.get("qk_rms_norm", True)))
    if kind == "sparse_vae":
        c = need("model_channels_encoder")
        if c != need("model_channels_decoder"):
            raise ReleaseConfigError(f"{path}: {section}: encoder and decoder widths differ ({c} vs {p['model_channels_decoder']})")
        res, chunks = need("resolution"), p.get("chunk_size")
        vae = SparseSDFVAE(latent_channels=need("embed_dim"), model_channels=c,
                           encoder_channels=(c // 16, c // 8, c // 4, c), decoder_channels=(c // 4, c // 8, c // 16),
                           num_blocks=need("num_blocks_encoder"), num_heads=need("num_heads_encoder"),
                           chunk_size=res // chunks if chunks and chunks > 1 else None, init_logvar=0.0)
        vae.resolution = res  # latent grid side (64 at 512, 128 at 1024)
        return vae
    if kind == "sparse_dit":
        # ssa_backend (not in released configs): 'auto' | 'triton' | 'torch' (see SSAConfig)
        ssa = dict(m_cmp=need("compression_block_size"), m_slc=need("selection_block_size"), topk=need("topk"),
                   compression=p.get("compression_version", "v1"), backend=p.get("ssa_backend", "auto"))
        dit = SparseDiT(need("in_channels"), need("model_channels"), need("cond_channels"), need("num_blocks"),
                        need("num_heads"), need("num_kv_heads"), float(p.get("mlp_ratio", 4)), "ssa",
                        int(p.get("window_size", 8)), bool(p.get("use_shift", True)), ssa, float(p.get("factor", 1.0)),
                        bool(p.get("sparse_conditions", False)))
        dit.resolution = need("resolution")
        return dit
    if kind in ("refiner", "refiner_1024"):
        # block_out_channels / feature_channels are hard-coded officially; these keys (not in released configs)
        # build small test models
        channels = tuple(p.get("block_out_channels", UNET_CHANNELS))
        common = dict(in_channels=p.get("in_channels", 1), out_channels=p.get("out_channels", 1),
                      layers_per_block=p.get("layers_per_block", 2), layers_mid_block=p.get("layers_mid_block", 2),
                      patch_size=need("patch_size"), channels=channels)
        if kind == "refiner":
            return VoxelRefiner(feature_channels=p.get("feature_channels", 32), **common)
        return SignRefiner(**common)
    raise ValueError(f"no d3ds2 model for config section {section!r}; sections: {MODEL_SECTIONS}")
