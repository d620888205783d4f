"""LightningModule of the sparse SDF VAE: losses, multires batches, mesh validation with geometry metrics."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn

from ..data.sdf_transforms import VAEBatch
from ..geometry.marching_cubes import sparse_marching_cubes
from ..models.vae_losses import VAELossWeights, vae_loss
from .base_module import BaseModule
from .pictures import open3d_available, publish_picture, render_pair


class VAEModule(BaseModule):
    """Args (besides BaseModule's): loss weights (``w_in, w_ext, w_sharp, w_kl, w_occ``, ``loss_kind``),
    ``val_meshes``: validation batches whose meshes are extracted and scored (Chamfer, F-score, normal
    consistency vs the iso-0 surface of the ground-truth SDF), ``render_meshes``: how many of those are
    rendered (ground truth | reconstruction) to ``<run dir>/val_renders/step_XXXXXXX.png``, TensorBoard
    and wandb (:func:`~d3ds2.training.pictures.publish_picture`);
    ``init_from``: a checkpoint whose net weights initialise the model (not a resume)."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        max_consecutive_nonfinite: int = 20,
        w_in: float = 1.0,
        w_ext: float = 0.1,
        w_sharp: float = 1.0,
        w_kl: float = 1e-3,
        w_occ: float = 1.0,
        loss_kind: str = "l1",
        val_meshes: int = 4,
        render_meshes: int = 2,
        fscore_threshold: float = 0.01,
        metric_points: int = 20_000,
        init_from: str | None = None,
    ) -> None:
        super().__init__(net, optimizer, scheduler, max_consecutive_nonfinite)
        if init_from:  # start from another run's weights (EMA preferred), e.g. stage 1 -> 1024 fine-tune
            from ..checkpoint import load_net_weights

            load_net_weights(init_from, self.net, prefer_ema=True)
        self.weights = VAELossWeights(w_in, w_ext, w_sharp, w_kl, w_occ, loss_kind)
        if render_meshes and not open3d_available("model.render_meshes"):
            render_meshes = 0
        self.val_meshes, self.render_meshes = val_meshes, render_meshes
        self.fscore_threshold, self.metric_points = fscore_threshold, metric_points
        self._renders: list[np.ndarray] = []

    def _batch_size(self, batch: VAEBatch) -> int:
        return batch.inputs.batch_size

    def _generator(self) -> torch.Generator:
        """Posterior noise seeded by the global step, so a resumed run draws what the straight run drew."""
        return torch.Generator(device=self.device).manual_seed(1_000_003 * self.global_step + 17)

    def forward_batch(self, batch: VAEBatch, stage: str):
        inputs = batch.inputs
        band = batch.targets.coords[batch.targets.feats[:, 1] > 0.5] if stage == "train" else None
        z, post = self.net.encode(inputs, sample=stage == "train")
        if stage == "train":
            z = z.replace(post.mean.feats + post.std * torch.randn(
                post.std.shape, generator=self._generator(), device=self.device, dtype=post.std.dtype))
        return self.net.decode(z, band), post

    def compute_loss(self, batch: VAEBatch, stage: str):
        out, post = self.forward_batch(batch, stage)
        loss, terms = vae_loss(out, post, batch.targets, self.weights)
        terms = {k: v.detach() for k, v in terms.items()}
        terms["resolution"] = torch.tensor(float(batch.resolution))
        return loss, terms, batch.num_voxels

    # -------------------------------------------------------------------------------------------
    def validation_step(self, batch: VAEBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx >= self.val_meshes:
            return
        with torch.no_grad():
            out, _ = self.forward_batch(batch, "val")
        metrics = self.mesh_metrics(batch, out.sdf)
        for k, v in metrics.items():
            self.log(f"val/{k}", v, batch_size=1, sync_dist=True)

    def mesh_metrics(self, batch: VAEBatch, pred_sdf) -> dict[str, float]:
        """Metrics of sample 0's decoded mesh vs the ground-truth iso-0 surface (NaN where a mesh is empty)."""
        from ..geometry.metrics import mesh_metrics

        R = batch.resolution
        gt = batch.targets.sample(0)
        pr = pred_sdf.sample(0)
        gt_mesh = sparse_marching_cubes(gt[1], gt[0][:, 0], R)
        pred_mesh = sparse_marching_cubes(pr[1], pr[0][:, 0], R)
        on_rank_zero = self._trainer is None or self.trainer.is_global_zero  # DDP: rank 0 renders
        if on_rank_zero and len(self._renders) < self.render_meshes and len(gt_mesh.faces):
            self._renders.append(render_pair([gt_mesh, pred_mesh]))
        if len(pred_mesh.faces) == 0 or len(gt_mesh.faces) == 0:
            return {"fscore": float("nan"), "chamfer_l1": float("nan"), "normal_consistency": float("nan")}
        m = mesh_metrics(pred_mesh, gt_mesh, self.metric_points, (self.fscore_threshold,))
        return {"fscore": m[f"fscore@{self.fscore_threshold}"], "chamfer_l1": m["chamfer_l1"],
                "normal_consistency": m["normal_consistency"]}

    def on_validation_epoch_end(self) -> None:
        renders, self._renders = self._renders, []
        if self._trainer is None or self.trainer.sanity_checking:
            return
        publish_picture(self, np.concatenate(renders, axis=0) if renders else None, "val/reconstructions")
