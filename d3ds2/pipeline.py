"""Image -> mesh inference: DINOv2 condition -> index DiT -> occupied latent cells -> sparse DiT -> sparse SDF
VAE decode -> marching cubes (-> 1024 refinement stage) -> optional simplification.

Models come from training runs (:meth:`ImageTo3DPipeline.from_runs`: ``config_resolved.yaml`` +
``checkpoints/last.ckpt``, EMA weights preferred) or from a released Direct3D-S2 folder
(:meth:`ImageTo3DPipeline.from_pretrained`, official defaults and refiners). Batches of images run together
through every stage; stages report time and peak memory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .flow import FlowSampler, guided_velocity, null_condition
from .checkpoint import load_checkpoint, load_net_weights
from .models.conditioner import ImageConditioner, preprocess_image
from .sparse import SparseTensor

log = logging.getLogger(__name__)


@dataclass
class StageSampling:
    """Euler sampler settings of one stage (official defaults: dense 50/6/7, sparse 512 30/6/7, 1024 15/8/7)."""

    steps: int = 50
    shift: float = 6.0
    guidance: float = 7.0
    guidance_interval: tuple[float, float] | None = None

    def sampler(self) -> FlowSampler:
        return FlowSampler(self.steps, self.shift, self.guidance, self.guidance_interval)


@dataclass
class StageReport:
    name: str
    seconds: float
    peak_gib: float | None
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# loading
def resolve_run(path: str | Path) -> tuple[Any, Path]:
    """A run directory (or a .ckpt / .safetensors inside ``<run>/checkpoints/``) -> (its resolved config,
    checkpoint path)."""
    from omegaconf import OmegaConf

    path = Path(path)
    ckpt = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    run = ckpt.parent.parent
    cfg_path = run / "config_resolved.yaml"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt}; give a training run directory or its .ckpt file")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: the checkpoint must sit in <run>/checkpoints/ of a train.py run")
    return OmegaConf.load(cfg_path), ckpt


def load_model(spec, ckpt: str | Path) -> nn.Module:
    """Instantiate ``spec`` (a ``_target_`` config) and load the net/EMA weights of ``ckpt``."""
    from hydra.utils import instantiate


    net = instantiate(spec)
    load_net_weights(ckpt, net, prefer_ema=True)
    return net.eval().requires_grad_(False)


@dataclass
class SparseStage:
    """One sparse stage: its DiT, latent statistics and VAE (fine resolution = VAE factor x latent grid)."""

    dit: nn.Module
    vae: nn.Module
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    resolution: int

    @classmethod
    def from_runs(cls, dit_run: str | Path, vae_run: str | Path, resolution: int) -> tuple["SparseStage", Any]:
        cfg, ckpt = resolve_run(dit_run)
        dit = load_model(cfg.model.net, ckpt)
        state = load_checkpoint(ckpt, "SparseStage", "the DiT run's checkpoint")["state_dict"]
        c = dit.in_channels
        mean, std = state.get("latent_mean", torch.zeros(c)), state.get("latent_std", torch.ones(c))
        vcfg, vckpt = resolve_run(vae_run)
        return cls(dit, load_model(vcfg.model.net, vckpt), mean, std, resolution), cfg


# ------------------------------------------------------------------------------------------------
class ImageTo3DPipeline:
    """Args: conditioner, index_vae (DenseShapeVAE), index_dit (DenseDiT), stage_512 (and optional
    stage_1024) :class:`SparseStage`; device; offload: keep models on the CPU except during their stage;
    index_threshold: occupancy probability of an occupied latent cell (official 0.1); mc_level: iso-level
    of the decoded (normalised) SDF (official 0.2); surface_band: |sdf| (normalised) of the 512 voxels that
    seed the 1024 latent cells when ``cells_from='band'``; cells_from: 'band' or 'mesh' (official: the 512
    mesh re-normalised, cells within 4 voxels of its surface, see :mod:`d3ds2.official.cells`);
    refiner_512 / refiner_1024: the official refiners (:mod:`d3ds2.models.refiner`), used when
    ``remove_interior``; grid_device: where the refiners' dense grids are assembled (the CPU for low VRAM);
    weights_dtype: storage dtype of the parameters (compute runs in bf16 autocast on CUDA);
    mesh_workers: processes extracting the meshes of a batch (see :func:`extract_meshes`); matting: a
    callable RGB [H, W, 3] float -> mask [H, W] for images without alpha (see :func:`load_matting`)."""

    def __init__(self, conditioner: ImageConditioner, index_vae: nn.Module, index_dit: nn.Module, stage_512: SparseStage,
                 stage_1024: SparseStage | None = None, device: str | torch.device = "cpu", offload: bool = False,
                 index_threshold: float = 0.1, mc_level: float = 0.0, surface_band: float = 0.5,
                 weights_dtype: torch.dtype | str = torch.float32, mesh_workers: int = 1, cells_from: str = "band",
                 refiner_512: nn.Module | None = None, refiner_1024: nn.Module | None = None, remove_interior: bool = True,
                 grid_device: str = "cpu", matting=None) -> None:
        if cells_from not in ("band", "mesh"):
            raise ValueError(f"cells_from must be 'band' or 'mesh', got {cells_from!r}")
        self.conditioner, self.index_vae, self.index_dit = conditioner.eval(), index_vae.eval(), index_dit.eval()
        self.stage_512, self.stage_1024 = stage_512, stage_1024
        self.refiner_512 = refiner_512.eval() if refiner_512 is not None else None
        self.refiner_1024 = refiner_1024.eval() if refiner_1024 is not None else None
        self.device, self.offload = torch.device(device), offload
        self.index_threshold, self.mc_level, self.surface_band = index_threshold, mc_level, surface_band
        self.cells_from, self.remove_interior, self.grid_device = cells_from, remove_interior, grid_device
        self.mesh_workers, self.matting = mesh_workers, matting
        self.reports: list[StageReport] = []
        dtype = getattr(torch, weights_dtype) if isinstance(weights_dtype, str) else weights_dtype
        self.weights_dtype = dtype
        for m in self._models():
            cast_parameters(m, dtype)
        if not offload:
            for m in self._models():
                m.to(self.device)

    @classmethod
    def from_runs(cls, index_dit: str, sparse_dit_512: str, vae_512: str, index_vae: str | None = None,
                  sparse_dit_1024: str | None = None, vae_1024: str | None = None, backbone: str | None = None, **kw) -> "ImageTo3DPipeline":
        """Load every model from its training run (see :func:`resolve_run`). The index VAE defaults to the
        index DiT run's ``model.vae_ckpt``; the conditioner to the SS-DiT run's ``model.conditioner`` or
        DINOv2 from ``backbone``."""
        from hydra.utils import instantiate

        icfg, ickpt = resolve_run(index_dit)
        dit = load_model(icfg.model.net, ickpt)
        vae = load_model(icfg.model.vae, index_vae or icfg.model.vae_ckpt)
        stage_512, scfg = SparseStage.from_runs(sparse_dit_512, vae_512, 8 * 4 * dit.resolution)
        stage_1024 = SparseStage.from_runs(sparse_dit_1024, vae_1024, 2 * stage_512.resolution)[0] if sparse_dit_1024 else None
        if backbone:
            conditioner = ImageConditioner(backbone=backbone)
        elif scfg.model.get("conditioner"):
            conditioner = instantiate(scfg.model.conditioner)
        else:
            raise ValueError("no image encoder: the SS-DiT run pre-computed its features; pass backbone=<DINOv2 dir or hub id>")
        return cls(conditioner, vae, dit, stage_512, stage_1024, **kw)

    @classmethod
    def from_pretrained(cls, path: str, backbone: str | None = None, weights_dtype: str | torch.dtype | None = None,
                        sections: tuple[str, ...] | None = None, **kw) -> "ImageTo3DPipeline":
        """A released Direct3D-S2 folder (config.yaml + model_*.ckpt, v1.0 or v1.1) with the official settings:
        mc_level 0.2, index threshold 0.1, 1024 cells from the 512 mesh, both refiners, weights in float16
        on CUDA when the config says use_fp16 (float32 on the CPU). backbone: DINOv2-L/14-with-registers (transformers dir or hub id; the
        release does not hold it). Other keyword arguments as in the constructor."""
        from .official import load_release

        rel = load_release(path, sections)
        m = rel.models
        fp16 = rel.config.use_fp16 and torch.device(kw.get("device", "cpu")).type == "cuda"
        conditioner = ImageConditioner(backbone=backbone) if backbone else ImageConditioner()

        def stage(res: str) -> SparseStage | None:
            if f"sparse_dit_{res}" not in m:
                return None
            dit, vae = m[f"sparse_dit_{res}"], m[f"sparse_vae_{res}"]
            c = dit.in_channels
            return SparseStage(dit, vae, torch.zeros(c), torch.ones(c), vae.factor * vae.resolution)

        kw = {"index_threshold": 0.1, "mc_level": 0.2, "cells_from": "mesh",
              "weights_dtype": weights_dtype or (torch.float16 if fp16 else torch.float32), **kw}
        pipe = cls(conditioner, m["dense_vae"], m["dense_dit"], stage("512"), stage("1024"),
                   refiner_512=m.get("refiner"), refiner_1024=m.get("refiner_1024"), **kw)
        pipe.release = rel
        return pipe

    def _models(self) -> list[nn.Module]:
        ms = [self.conditioner, self.index_vae, self.index_dit, self.stage_512.dit, self.stage_512.vae]
        if self.stage_1024 is not None:
            ms += [self.stage_1024.dit, self.stage_1024.vae]
        return ms + [r for r in (self.refiner_512, self.refiner_1024) if r is not None]

    # --------------------------------------------------------------------------------------------
    def _stage(self, name: str, models: list[nn.Module], fn, *args):
        """Run fn(*args) with ``models`` on the device (offload: back to the CPU after), timing + peak memory."""
        cuda = self.device.type == "cuda"
        if self.offload:
            for m in models:
                m.to(self.device)
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            out, info = fn(*args)
        if cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None
        if self.offload:
            for m in models:
                m.to("cpu")
            if cuda:
                torch.cuda.empty_cache()
        self.reports.append(StageReport(name, time.perf_counter() - start, peak, info))
        log.info("%s: %.2f s%s %s", name, self.reports[-1].seconds, f", peak {peak:.2f} GiB" if peak is not None else "", info)
        return out

    def _condition(self, images: torch.Tensor):
        tokens = self.conditioner(images.to(self.device))
        return (tokens, images[:, 3:].to(self.device)), {"tokens": tuple(tokens.shape)}

    def _index(self, tokens: torch.Tensor, sampling: StageSampling, gen: torch.Generator):
        dit, b, r = self.index_dit, tokens.shape[0], self.index_dit.resolution
        noise = torch.randn(b, dit.in_channels, r, r, r, generator=gen).to(self.device)
        uncond = null_condition(tokens)

        def velocity(x, t, w):
            return guided_velocity(lambda xx, tt, cc: dit(xx, tt, cc).float(), x, t, tokens, uncond, w)

        z = sampling.sampler().sample(velocity, noise, b, progress="index DiT")
        logits = self.index_vae.decode(z.to(next(self.index_vae.parameters()).dtype)).float()[:, 0]
        return occupied_cells(logits, self.index_threshold), {"cells": int((torch.sigmoid(logits) >= self.index_threshold).sum())}

    def _sparse(self, stage: SparseStage, coords: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor, b: int,
                sampling: StageSampling, gen: torch.Generator, name: str):
        dit = stage.dit
        cond = self.conditioner.sparse(tokens, masks) if dit.sparse_conditions else tokens
        uncond = null_condition(cond)
        x = SparseTensor(torch.zeros(len(coords), 0, device=self.device), coords.to(self.device), b)

        def velocity(feats, t, w):
            model = lambda xx, tt, cc: dit(xx, tt, cc).feats.float()  # noqa: E731
            return guided_velocity(model, x.replace(feats), t, cond, uncond, w)

        noise = torch.randn(len(coords), dit.in_channels, generator=gen).to(self.device)
        latents = sampling.sampler().sample(velocity, noise, b, progress=name)
        latents = latents * stage.latent_std.to(self.device) + stage.latent_mean.to(self.device)
        return x.replace(latents), {"tokens": int(len(coords)), "max_tokens_per_sample": int(x.counts.max())}

    def _decode(self, stage: SparseStage, latents: SparseTensor):
        out = stage.vae.decode(latents)
        return (out.sdf.replace(out.sdf.feats.float()), out.feats), {"fine_voxels": out.sdf.num_voxels}

    def _refine(self, refiner: nn.Module, sdf: SparseTensor, feats: SparseTensor | None, resolution: int, level: float):
        """Official interior removal: dense refined SDF (patch by patch) -> dense marching cubes at ``level``."""
        from .geometry.marching_cubes import dense_marching_cubes

        if feats is not None:
            grid = refiner.refine(sdf, feats, resolution, grid_device=self.grid_device)
        else:
            grid = refiner.refine(sdf, resolution, grid_device=self.grid_device)
        meshes = [dense_marching_cubes(g, level) for g in grid]
        return meshes, {"faces": [len(m.faces) for m in meshes]}

    def _mesh_512(self, sdf: SparseTensor, feats: SparseTensor, resolution: int) -> list:
        if self.remove_interior and self.refiner_512 is not None:  # official: MC at 2 x mc_level on the refined SDF
            return self._stage("refiner 512", [self.refiner_512], self._refine, self.refiner_512, sdf, feats, resolution,
                               2 * self.mc_level)
        return self._stage("mesh", [], self._meshes, sdf, resolution, None)

    def _meshes(self, sdf: SparseTensor, resolution: int, simplify: float | None):
        meshes = self._simplified(extract_meshes(sdf, resolution, self.mc_level, self.mesh_workers), simplify)
        return meshes, {"faces": [len(m.faces) for m in meshes]}

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: list, resolution: int = 512, seed: int = 0, dense: StageSampling | None = None,
                 sparse_512: StageSampling | None = None, sparse_1024: StageSampling | None = None,
                 simplify: float | None = None, cells_512: torch.Tensor | None = None,
                 cells_1024: torch.Tensor | None = None) -> list:
        """images: paths / PIL images / arrays -> list of trimesh meshes in [-1, 1]^3 (one per image).

        simplify: fraction of faces to keep (None: no simplification); cells_512 / cells_1024: int (batch, x,
        y, z) latent cells that replace the index stage / the 1024 cell derivation (known occupancy,
        controlled token counts in benchmarks)."""
        if resolution not in (512, 1024):
            raise ValueError(f"resolution must be 512 or 1024, got {resolution}")
        if resolution == 1024 and self.stage_1024 is None:
            raise ValueError("resolution=1024 needs the 1024 SS-DiT and VAE (ckpt.sparse_dit_1024, ckpt.vae_1024)")
        dense = dense or StageSampling(50, 6.0, 7.0)
        sparse_512 = sparse_512 or StageSampling(30, 6.0, 7.0)
        sparse_1024 = sparse_1024 or StageSampling(15, 8.0, 7.0)
        self.reports = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator().manual_seed(seed)
        batch = torch.stack([preprocess_image(im, self.conditioner.image_size, matting=self.matting) for im in images])
        b = batch.shape[0]
        tokens, masks = self._stage("condition", [self.conditioner], self._condition, batch)
        if cells_512 is None:
            coords = self._stage("index DiT", [self.index_dit, self.index_vae], self._index, tokens, dense, gen)
        else:
            coords = cells_512.int()
        s = self.stage_512
        latents = self._stage("sparse DiT 512", [s.dit], self._sparse, s, coords, tokens, masks, b, sparse_512, gen, "sparse DiT 512")
        sdf, feats = self._stage("VAE decode 512", [s.vae], self._decode, s, latents)
        del latents
        if resolution == 512 or self.cells_from == "mesh":
            meshes = self._mesh_512(sdf, feats, s.resolution)
        if resolution == 512:
            return self._simplified(meshes, simplify)
        s = self.stage_1024
        if cells_1024 is not None:
            cells = cells_1024.int()
        elif self.cells_from == "mesh":
            from .official.cells import batch_mesh_cells

            cells = batch_mesh_cells(meshes, s.resolution)
        else:
            cells = refine_cells(sdf, self.surface_band, s.resolution)
        del sdf, feats
        latents = self._stage("sparse DiT 1024", [s.dit], self._sparse, s, cells, tokens, masks, b, sparse_1024, gen, "sparse DiT 1024")
        sdf, _ = self._stage("VAE decode 1024", [s.vae], self._decode, s, latents)
        if self.remove_interior and self.refiner_1024 is not None:
            meshes = self._stage("refiner 1024", [self.refiner_1024], self._refine, self.refiner_1024, sdf, None,
                                 s.resolution, self.mc_level)
            return self._simplified(meshes, simplify)
        return self._stage("mesh", [], self._meshes, sdf, s.resolution, simplify)

    def _simplified(self, meshes: list, simplify: float | None) -> list:
        if simplify is None:
            return meshes
        return [m.simplify_quadric_decimation(face_count=max(4, int(len(m.faces) * simplify))) if len(m.faces) > 100 else m
                for m in meshes]


def extract_meshes(sdf: SparseTensor, resolution: int, level: float = 0.0, workers: int = 1) -> list:
    """Decoded SDF (feats [N, 1] on fine voxels of a batch) -> one mesh per sample (sparse marching cubes at
    ``level``, [-1, 1]^3 frame). ``workers`` > 1 runs the samples in that many forked processes (about 2-4 s
    per 256^3 mesh on one core)."""
    from .geometry.marching_cubes import sparse_marching_cubes

    jobs = [(coords.cpu().numpy(), feats[:, 0].float().cpu().numpy(), resolution, level) for feats, coords in sdf.unbind()]
    if workers <= 1 or len(jobs) <= 1:
        return [sparse_marching_cubes(*j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(sparse_marching_cubes, *zip(*jobs)))


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the parameters in ``dtype`` (bf16 halves the resident weights); buffers (PE frequencies) stay."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def occupied_cells(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Occupancy logits [B, R, R, R] -> int32 (batch, x, y, z) of cells with sigmoid >= threshold, sorted.

    A sample with no such cell keeps its single most probable cell (so every sample has tokens)."""
    occ = torch.sigmoid(logits) >= threshold
    empty = ~occ.flatten(1).any(1)
    if empty.any():
        flat = occ.flatten(1).clone()
        best = logits.flatten(1).argmax(1)
        flat[empty, best[empty]] = True
        occ = flat.view_as(occ)
    return occ.nonzero().int()


def refine_cells(sdf: SparseTensor, band: float, resolution: int) -> torch.Tensor:
    """Latent cells of the next stage (fine ``resolution``, twice the current one) around the decoded surface:
    fine voxels with |sdf| < band, their children's cells (2 p) // 8, unique and sorted."""
    keep = sdf.feats[:, 0].abs() < band
    c = sdf.coords[keep]
    cells = torch.cat([c[:, :1], torch.div(2 * c[:, 1:], 8, rounding_mode="floor")], 1)
    if cells.shape[0] and int(cells[:, 1:].max()) >= resolution // 8:
        raise ValueError("refine_cells: cells fall outside the next stage's latent grid")
    return torch.unique(cells, dim=0).int()
