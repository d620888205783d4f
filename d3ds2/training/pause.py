"""``PauseAfter``: end this process's training after a wall-clock budget, leaving a run to resume."""
from __future__ import annotations

import time

import lightning as L


class PauseAfter(L.Callback):
    """Stop fitting once ``seconds`` have passed since this process started training (not counting earlier
    processes of the run, unlike ``trainer.max_time``); the runner then writes ``last.ckpt`` and no finished
    marker, so ``ckpt_path=last`` continues the run. For jobs cut into time slices (a cluster's wall-time
    limit, a machine lent for minutes)."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"pause_after must be a positive number of seconds, got {seconds}")
        self.seconds = float(seconds)
        self.paused = False
        self._start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        due = self._start is not None and time.monotonic() - self._start >= self.seconds
        due = trainer.strategy.broadcast(due)  # rank 0 decides for every rank
        if due and not trainer.should_stop:
            trainer.should_stop = True
            self.paused = True
