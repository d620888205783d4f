"""The training stream's position in checkpoints, for data modules whose training batches are
:class:`~d3ds2.data.stream_position.Positioned`."""
from __future__ import annotations

import torch

from ..data.stream_position import Positioned


class StreamStateMixin:
    """For a LightningDataModule: unwraps positioned training batches, logs the damaged-sample count of the
    epoch (``data/skipped_samples``) and saves / restores the stream position with the checkpoint
    (``self.position`` is what a restored run starts from)."""

    position: dict | None = None
    _last: dict | None = None
    _readers: dict | None = None

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, Positioned):
            return batch
        pos = batch.position
        self._last, self._readers = pos, self._readers or {}
        reader = pos.get("reader")
        if reader is not None:
            old = self._readers.get(str(pos["role"]), {})
            self._readers[str(pos["role"])] = reader
            trainer = getattr(self, "trainer", None)
            if reader["skipped"] != old.get("skipped", 0) and trainer is not None:
                skipped = sum(r["skipped"] for r in self._readers.values())
                for logger in trainer.loggers:
                    logger.log_metrics({"data/skipped_samples": skipped, "data/epoch": reader["epoch"]},
                                       step=trainer.global_step)
        return batch.batch

    def state_dict(self) -> dict:
        """The last batch taken and every reader's (epoch, offset), per rank (gathered from all ranks)."""
        if self._last is None:
            return dict(self.position or {})
        mine = {role: {"epoch": r["epoch"], "offset": r["offset"]} for role, r in (self._readers or {}).items()}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"batch": self._last["batch"], "world": self._last["world"], "workers": self._last["workers"],
                "readers": {str(r): v for r, v in enumerate(ranks)}}

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state) if state else None
