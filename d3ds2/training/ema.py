"""Exponential moving average of the trained ``net``'s weights, as a Lightning callback."""
from __future__ import annotations

import lightning as L
import torch


class EMA(L.Callback):
    """Keep a float32 shadow ``ema = d * ema + (1 - d) * param`` of ``pl_module.net``.

    With ``warmup`` the rate ramps up as ``d = min(decay, (1 + n) / (10 + n))`` after n updates, so a short run's
    shadow is not dominated by the random initial weights (0.99 ** 60 = 55 % of them without it); n follows
    from the global step, so a resumed run continues the same ramp. The shadow is saved in checkpoints (``checkpoint['ema']``, keys of ``net.state_dict()``) and restored
    on resume; with ``use_for_validation`` it replaces the live weights during validation and test.
    """

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1, use_for_validation: bool = True,
                 warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.every_n_steps, self.use_for_validation = decay, every_n_steps, use_for_validation
        self.warmup = warmup
        self.shadow: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] | None = None
        self._loaded: dict[str, torch.Tensor] | None = None

    def _float_state(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v for k, v in pl_module.net.state_dict().items() if v.is_floating_point()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None:
            self.shadow = {k: v.to(pl_module.device) for k, v in self._loaded.items()}
        elif self.shadow is None:
            self.shadow = {k: v.detach().float().clone() for k, v in self._float_state(pl_module).items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.shadow is None or trainer.global_step % self.every_n_steps:
            return
        decay = self.decay_at(max(trainer.global_step // self.every_n_steps - 1, 0))  # the step just taken
        for k, v in self._float_state(pl_module).items():
            self.shadow[k].lerp_(v.float(), 1.0 - decay)

    def decay_at(self, updates: int) -> float:
        """The rate of the update that follows ``updates`` earlier ones."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates)) if self.warmup else self.decay

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.use_for_validation or self.shadow is None:
            return
        state = self._float_state(pl_module)
        self._backup = {k: v.detach().clone() for k, v in state.items()}
        pl_module.net.load_state_dict({k: self.shadow[k].to(v.dtype) for k, v in state.items()}, strict=False)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            pl_module.net.load_state_dict(self._backup, strict=False)
            self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.shadow is not None:
            checkpoint["ema"] = {k: v.detach().cpu() for k, v in self.shadow.items()}
            checkpoint["ema_decay"] = self.decay

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self._loaded = checkpoint["ema"]
