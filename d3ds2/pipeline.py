"""Image -> mesh inference: DINOv2 condition -> index DiT -> occupied latent cells -> sparse DiT -> sparse SDF
VAE decode -> sparse marching cubes (-> 1024 refinement stage) -> optional simplification.

Every model is loaded from a training run (its ``config_resolved.yaml`` + ``checkpoints/last.ckpt``, EMA
weights preferred). Batches of images run together through every stage; stages report time and peak memory.
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
    of the decoded (normalised) SDF; surface_band: |sdf| (normalised) of the 512 voxels that seed the 1024
    latent cells; weights_dtype: storage dtype of the parameters (compute runs in bf16 autocast on CUDA);
    mesh_workers: processes extracting the meshes of a batch (see :func:`extract_meshes`)."""

    def __init__(self, conditioner: ImageConditioner, index_vae: nn.Module, index_dit: nn.Module, stage_512: SparseStage,
                 stage_1024: SparseStage | None = None, device: str | torch.device = "cpu", offload: bool = False,
                 index_threshold: float = 0.1, mc_level: float = 0.0, surface_band: float = 0.5,
                 weights_dtype: torch.dtype | str = torch.float32, mesh_workers: int = 1) -> None:
        self.conditioner, self.index_vae, self.index_dit = conditioner.eval(), index_vae.eval(), index_dit.eval()
        self.stage_512, self.stage_1024 = stage_512, stage_1024
        self.device, self.offload = torch.device(device), offload
        self.index_threshold, self.mc_level, self.surface_band = index_threshold, mc_level, surface_band
        self.mesh_workers = mesh_workers
        self.reports: list[StageReport] = []
        dtype = getattr(torch, weights_dtype) if isinstance(weights_dtype, str) else weights_dtype
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

    def _models(self) -> list[nn.Module]:
        ms = [self.conditioner, self.index_vae, self.index_dit, self.stage_512.dit, self.stage_512.vae]
        if self.stage_1024 is not None:
            ms += [self.stage_1024.dit, self.stage_1024.vae]
        return ms

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
        sdf = stage.vae.decode(latents).sdf
        return sdf.replace(sdf.feats.float()), {"fine_voxels": sdf.num_voxels}

    def _meshes(self, sdf: SparseTensor, resolution: int, simplify: float | None):
        meshes = extract_meshes(sdf, resolution, self.mc_level, self.mesh_workers)
        if simplify is not None:
            meshes = [m.simplify_quadric_decimation(face_count=max(4, int(len(m.faces) * simplify))) if len(m.faces) > 100 else m
                      for m in meshes]
        return meshes, {"faces": [len(m.faces) for m in meshes]}

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: list, resolution: int = 512, seed: int = 0, dense: StageSampling | None = None,
                 sparse_512: StageSampling | None = None, sparse_1024: StageSampling | None = None,
                 simplify: float | None = None) -> list:
        """images: paths / PIL images / arrays -> list of trimesh meshes in [-1, 1]^3 (one per image).

        simplify: fraction of faces to keep (None: no simplification)."""
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
        batch = torch.stack([preprocess_image(im, self.conditioner.image_size) for im in images])
        b = batch.shape[0]
        tokens, masks = self._stage("condition", [self.conditioner], self._condition, batch)
        coords = self._stage("index DiT", [self.index_dit, self.index_vae], self._index, tokens, dense, gen)
        s = self.stage_512
        latents = self._stage("sparse DiT 512", [s.dit], self._sparse, s, coords, tokens, masks, b, sparse_512, gen, "sparse DiT 512")
        sdf = self._stage("VAE decode 512", [s.vae], self._decode, s, latents)
        if resolution == 1024:
            s = self.stage_1024
            cells = refine_cells(sdf, self.surface_band, s.resolution)
            latents = self._stage("sparse DiT 1024", [s.dit], self._sparse, s, cells, tokens, masks, b, sparse_1024, gen, "sparse DiT 1024")
            sdf = self._stage("VAE decode 1024", [s.vae], self._decode, s, latents)
        return self._stage("mesh", [], self._meshes, sdf, s.resolution, simplify)


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
