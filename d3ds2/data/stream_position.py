"""Where a training stream stands, so that a resumed run reads exactly the batches an uninterrupted one would.

With W loader workers the DataLoader takes batch j from worker j mod W. A stream resumed after global batch
B - 1 therefore gives worker w the global batches g = B + w + k W: its reader plays the role (B + w) mod W, the
same residue class of batches in every run. Each training batch carries a position (:class:`Positioned`);
the data module keeps the last one of every role and saves them (see
:class:`d3ds2.training.stream_state.StreamStateMixin`).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Positioned(NamedTuple):
    """A training batch and the stream position after it: {batch (global index g), rank, role, world, workers,
    reader: {epoch, offset, skipped, seen}} (reader: for shard readers)."""

    batch: Any
    position: dict


def first_batch(position: dict | None, start: int) -> int:
    """The global index of the first batch to produce: after the saved one, else ``start``."""
    return int(position["batch"]) + 1 if position else start


def restore_reader(reader, position: dict | None, rank: int, world: int, role: int, workers: int):
    """Put a :class:`~d3ds2.data.shards.ShardReader` where the saved position of (rank, role) left it."""
    saved = (position or {}).get("readers", {}).get(str(rank), {}).get(str(role))
    if saved is None:
        return reader
    if (position.get("world"), position.get("workers")) != (world, workers):
        log.warning("the saved stream position is for %s ranks x %s loader workers, this run has %d x %d: the "
                    "shard stream starts a new epoch", position.get("world"), position.get("workers"), world, workers)
        reader.restore({"epoch": int(saved["epoch"]) + 1, "offset": 0})
    else:
        reader.restore(saved)
    return reader


def positioned(batch, g: int, rank: int, role: int, world: int, workers: int, reader=None,
               pending: bool = False) -> Positioned:
    """``batch`` with its position; ``pending``: the reader has taken one sample that is not in a batch yet."""
    position = {"batch": g, "rank": rank, "role": role, "world": world, "workers": workers}
    if reader is not None:
        position["reader"] = {**reader.state(), "skipped": reader.skipped, "seen": reader.seen}
        position["reader"]["offset"] -= int(pending)
    return Positioned(batch, position)
