"""Webdataset shards: atomic writing, a JSONL manifest, and the streaming reader every data module uses.

Every file is written under a temporary name in the same folder and renamed when complete, so a killed
process or a full disk never leaves a half-written file under a final name.

Reading goes through the webdataset library (``gopen``: local paths, ``pipe:`` commands, ``http(s)://`` URLs;
its tar member iterator and key grouping). Around it, :func:`shard_files` checks each shard for damage that
the tar iterator passes over in silence: a member cut short, a corrupted header in the middle (the rest of the
shard is found again at the next intact header) and a shard cut at a member boundary (no end-of-archive
blocks). Each is reported with the shard and the sample key, and the damaged sample is dropped.
A shard that cannot be opened at all (a URL that does not answer, a missing file) raises
:class:`ShardUnreachable`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zlib
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset

from .layout import is_remote

log = logging.getLogger(__name__)
BLOCK = 512
DAMAGED = "__damaged__"  # suffix of the marker entry that flags a sample as damaged


class ShardUnreachable(OSError):
    """A shard could not be opened or fetched (missing file, URL that does not answer)."""


class DamagedShardError(ValueError):
    """A shard read strictly (``read_tar``) is damaged."""


def write_tar_atomic(path: str, samples: list[dict]) -> None:
    """Write webdataset dicts (`__key__` + name -> bytes) as one tar at `path` (temp name, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, "w") as tar:
            for sample in samples:
                key = sample["__key__"]
                for name, data in sorted(sample.items()):
                    if name.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _Tracked:
    """A read-only stream that counts bytes and keeps what it read from offset ``keep_from`` on."""

    def __init__(self, stream, start: int = 0) -> None:
        self.stream, self.pos, self.keep_from = stream, start, start
        self.kept, self.kept_start = bytearray(), start

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.kept += data
        self.pos += len(data)
        if self.keep_from > self.kept_start:
            drop = min(self.keep_from - self.kept_start, len(self.kept))
            del self.kept[:drop]
            self.kept_start += drop
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def at(self, offset: int, size: int = BLOCK) -> bytes:
        """Bytes [offset, offset + size) if still kept (shorter at the end of the stream)."""
        i = offset - self.kept_start
        return bytes(self.kept[i : i + size]) if i >= 0 else b""

    def close(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()


def _header(block: bytes) -> tuple[str, int] | None:
    """(member name, data size) of a valid ustar header block, else None (zero, short or bad checksum)."""
    if len(block) < BLOCK or not any(block):
        return None
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:BLOCK]):
        return None
    return block[:100].split(b"\0")[0].decode("utf-8", "replace"), size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _key(name: str) -> str:
    return os.path.basename(name).split(".", 1)[0] or "?"


def _why(e: Exception) -> str:
    """An exception as 'Type: message', without the stream that webdataset appends to the message."""
    return f"{type(e).__name__}: {str(e).split(' @ ')[0]}"


def _marker(key: str, url: str, reason: str) -> dict:
    return {"fname": f"{key}.{DAMAGED}", "data": reason.encode(), "__url__": url}


Report = Callable[[str, str, str], None]  # (url, key or "", reason)


def _members(url: str, stream: _Tracked, report: Report) -> Iterator[dict]:
    """{fname, data, __url__} of each intact member of one uncompressed tar stream; damage -> report + marker."""
    from webdataset.tariterators import tar_file_iterator

    errors: list[Exception] = []
    q, checked, last = stream.pos, True, None  # q: where the next header should start
    try:
        for f in tar_file_iterator(stream, handler=lambda e: errors.append(e) or True):
            if errors:
                break
            head = _header(stream.at(q)) if checked else None
            if head is None or _key(head[0]) != _key(f["fname"]) or head[1] != len(f["data"]):
                checked = False  # not a plain one-block-per-member archive: the end checks are off
            else:
                q += BLOCK + _padded(head[1])
                stream.keep_from = q
            last = f["fname"]
            f["__url__"] = url
            yield f
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, OSError) and not isinstance(e, tarfile.TarError) and last is None:
            raise ShardUnreachable(f"shard {url} could not be read: {e}") from None
        errors.append(e)
    after = f"after sample {_key(last)!r}" if last else "at its start"
    head = _header(stream.at(q)) if checked else None
    if errors and (head is not None or not checked):  # a member cut short: its header is intact
        key = _key(head[0]) if head else ""
        report(url, key, f"unreadable {after} ({_why(errors[0])}); the rest of the shard is skipped")
        if key:
            yield _marker(key, url, "member cut short")
        return
    if not checked:
        return
    stream.drain()
    block = stream.at(q)
    if len(block) == BLOCK and not any(block):
        return  # end-of-archive blocks: intact
    if len(block) < BLOCK:
        report(url, "", f"truncated {after} at byte {q} (no end-of-archive blocks); samples after it are lost")
        return
    name = block[:100].split(b"\0")[0].decode("utf-8", "replace")
    key = _key(name) if name.isprintable() and "." in name else ""
    resume = next((o for o in range(q + BLOCK, stream.pos, BLOCK) if _header(stream.at(o)) is not None), None)
    report(url, key, f"corrupted tar header at byte {q} {after}; "
                     + ("reading on from the next intact header" if resume else "nothing readable after it"))
    if key:
        yield _marker(key, url, "corrupted header")
    if resume is not None:
        rest = _Tracked(io.BytesIO(stream.at(resume, stream.pos - resume)), start=resume)
        yield from _members(url, rest, report)


def _open(url: str):
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except OSError as e:
        raise ShardUnreachable(f"shard {url} could not be opened: {e}") from None


def shard_files(url: str, report: Report) -> Iterator[dict]:
    """Tar members of one shard as webdataset file dicts, damage reported (see the module docstring)."""
    raw = _open(url)
    finished = False
    try:
        try:
            head = raw.read(BLOCK)
        except OSError as e:
            raise ShardUnreachable(f"shard {url} did not answer: {e}") from None
        if not head and is_remote(url):
            raise ShardUnreachable(f"shard {url} gave no data")
        stream = _Prefixed(head, raw)
        if not head:
            report(url, "", "empty file")
        elif head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":  # compressed: no checks
            from webdataset.tariterators import tar_file_iterator

            try:
                for f in tar_file_iterator(stream, handler=lambda e: report(url, "", _why(e)) or False):
                    f["__url__"] = url
                    yield f
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                report(url, "", f"unreadable compressed tar ({_why(e)}); the rest of the shard is skipped")
        else:
            yield from _members(url, _Tracked(stream), report)
        finished = True
    finally:
        try:
            raw.close()
        except OSError as e:  # a pipe or curl that failed after it started (not one closed early by us)
            if finished:
                raise ShardUnreachable(f"shard {url} could not be fetched: {e}") from None


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read put back in front."""

    def __init__(self, head: bytes, rest) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
            return out
        return self.rest.read(n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def shard_samples(url: str, report: Report) -> Iterator[dict]:
    """Raw samples (webdataset dicts: ``__key__``, ``__url__``, entry name -> bytes) of one shard; a sample
    with a damaged member is reported and dropped."""
    from webdataset.tariterators import group_by_keys

    def handler(e: Exception) -> bool:
        report(url, "", _why(e))
        return True

    for sample in group_by_keys(shard_files(url, report), handler=handler):
        if DAMAGED in sample:
            continue  # reported where the damage was found
        yield sample


def read_tar(url: str) -> list[dict]:
    """All samples of one shard; any damage raises :class:`DamagedShardError` naming the shard and key."""

    def strict(u: str, key: str, reason: str) -> None:
        raise DamagedShardError(f"shard {u}" + (f", sample {key}" if key else "") + f": {reason}")

    return list(shard_samples(url, strict))


class Manifest:
    """Append-only JSONL: one line per input ({key, source, status: ok|skipped, reason, seconds, ...})."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: ignore, the input is redone
                    pass
        return out

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# The stream: epochs, splitting over ranks x loader workers, resampling, a shuffle buffer, a resumable position.


class TooManyDamaged(RuntimeError):
    """More samples were damaged than ``max_skip_fraction`` allows."""


def dist_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else RANK / WORLD_SIZE (as webdataset's node splitter)."""
    from webdataset.utils import pytorch_worker_info

    rank, world, _, _ = pytorch_worker_info()
    return rank, world


def loader_worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def shards_for(urls: list[str], slot: int, slots: int) -> list[str]:
    """The shards one reader (slot of rank x worker) reads: disjoint, covering all."""
    return urls[slot::slots]


class ShardReader:
    """The samples of one reader (``slot`` of ``slots`` = ranks x loader workers), epoch after epoch.

    Epoch e: the shard list is permuted by (seed, e) (the same order on every rank; kept in file order when
    ``shuffle_buffer`` is 0) and dealt out over the
    readers (or, with ``resample``, each reader draws as many shards with replacement by (seed, e, slot));
    when there are fewer shards than readers every reader reads all of them and keeps every slots-th sample.
    Raw samples pass a shuffle buffer of ``shuffle_buffer`` (rng (seed, e, slot); 0 = file order) and are
    decoded by ``decode``. The position (:meth:`state`) is (epoch, offset = samples taken in that epoch); a
    reader restored to it replays the epoch's raw samples up to the offset without decoding them, so it goes
    on with exactly the samples an uninterrupted reader would have given.
    Damaged samples are logged (shard and key), counted per epoch, and skipped; when more than
    ``max_skip_fraction`` of an epoch's samples (checked from 50 samples on, and at its end) are damaged the
    reader raises :class:`TooManyDamaged`.
    """

    def __init__(self, urls: list[str], slot: int, slots: int, decode: Callable[[dict], Any], seed: int = 0,
                 shuffle_buffer: int = 64, resample: bool = False, max_skip_fraction: float = 0.01) -> None:
        if not urls:
            raise ValueError("no shard given")
        self.urls, self.slot, self.slots, self.decode = list(urls), slot, slots, decode
        self.seed, self.buffer, self.resample, self.max_skip = seed, shuffle_buffer, resample, max_skip_fraction
        self.epoch, self.offset = 0, 0
        self.seen = self.skipped = 0  # samples (good or damaged) and damaged samples/shard parts this epoch
        self.damage: list[str] = []

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def _shards(self) -> tuple[list[str], bool]:
        if self.resample:
            rng = np.random.default_rng((self.seed, self.epoch, self.slot))
            n = max(1, len(self.urls) // self.slots)
            return [self.urls[i] for i in rng.integers(len(self.urls), size=n)], True
        order = list(self.urls)
        if self.buffer > 0:  # shuffled reading: a new shard order per epoch; else file order
            np.random.default_rng((self.seed, self.epoch)).shuffle(order)
        if len(order) >= self.slots:
            return shards_for(order, self.slot, self.slots), True
        return order, False

    def _report(self, url: str, key: str, reason: str, counted: bool = False) -> None:
        """One damaged sample (key) or shard part (no key; it stands for at least one lost sample)."""
        self.skipped += 1
        self.seen += not counted
        msg = f"damaged shard {url}" + (f", sample {key}" if key else "") + f": {reason}; skipped"
        self.damage.append(msg)
        if not self._replaying:
            log.warning(msg)
        self._check(final=False)

    def _check(self, final: bool) -> None:
        if self.seen and (final or self.seen >= 50) and self.skipped > self.max_skip * self.seen:
            raise TooManyDamaged(
                f"{self.skipped} of {self.seen} samples of epoch {self.epoch} were damaged and skipped (reader "
                f"{self.slot} of {self.slots}), above max_skip_fraction={self.max_skip}; the warnings name the "
                "shards and keys: rewrite or remove those shards, or raise data.max_skip_fraction")

    def _raw(self) -> Iterator[dict]:
        shards, whole = self._shards()
        i = 0
        for url in shards:
            for sample in shard_samples(url, self._report):
                if not whole:
                    i += 1
                    if (i - 1) % self.slots != self.slot:
                        continue
                self.seen += 1
                yield sample

    def _shuffled(self) -> Iterator[dict]:
        if self.buffer <= 0:
            yield from self._raw()
            return
        rng = np.random.default_rng((self.seed, self.epoch, self.slot, 1))
        buf: list[dict] = []
        for sample in self._raw():
            buf.append(sample)
            if len(buf) >= self.buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def epoch_samples(self) -> Iterator[Any]:
        """The decoded samples of the current epoch from the current offset; advances the epoch at its end."""
        self.seen = self.skipped = 0
        self._replaying = self.offset > 0
        taken = 0
        for raw in self._shuffled():
            taken += 1
            if taken <= self.offset:
                continue
            self._replaying = False
            self.offset = taken
            try:
                sample = self.decode(raw)
            except Exception as e:  # a damaged entry (zip CRC, truncated PNG, bad JSON)
                self._report(raw.get("__url__", "?"), raw["__key__"], f"cannot decode ({type(e).__name__}: {e})",
                             counted=True)
                continue
            yield sample
        self._replaying = False
        self._check(final=True)
        if self.skipped:
            log.warning("epoch %d, reader %d/%d: %d damaged samples skipped of %d", self.epoch, self.slot,
                        self.slots, self.skipped, self.seen)
        self.epoch, self.offset = self.epoch + 1, 0

    def samples(self) -> Iterator[Any]:
        """Decoded samples, epoch after epoch (forever); a reader that gets no sample in an epoch raises."""
        while True:
            got = self.offset > 0  # a reader restored at the end of an epoch has nothing left of it
            for sample in self.epoch_samples():
                got = True
                yield sample
            if not got:
                raise RuntimeError(f"reader {self.slot} of {self.slots} got no sample from {len(self.urls)} shards "
                                   "in a whole epoch; use fewer loader workers or more shards")

    _replaying = False


def decode_data_sample(raw: dict, resolutions=None, with_views: bool = True) -> dict:
    from .shard_format import decode_sample

    return decode_sample(raw, resolutions, with_views)


class ShardStream(IterableDataset):
    """One epoch of decoded data samples for this rank and loader worker (``iter``), ``set_epoch`` between
    epochs: the :class:`ShardReader` of the current process's slot. Rank and world size come from
    torch.distributed (or RANK / WORLD_SIZE) unless given."""

    def __init__(self, urls: list[str], shuffle_buffer: int = 64, seed: int = 0, resolutions=None,
                 with_views: bool = True, rank: int | None = None, world_size: int | None = None,
                 resample: bool = False, max_skip_fraction: float = 0.01):
        from functools import partial

        if not urls:
            raise ValueError("ShardStream: no shard given")
        self.urls, self.buffer, self.seed, self.resample = sorted(urls), shuffle_buffer, seed, resample
        self.decode = partial(decode_data_sample, resolutions=resolutions, with_views=with_views)
        self.rank, self.world_size, self.epoch, self.max_skip = rank, world_size, 0, max_skip_fraction

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rank, world = dist_rank()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        worker, workers = loader_worker()
        reader = ShardReader(self.urls, rank * workers + worker, world * workers, self.decode, self.seed,
                             self.buffer, self.resample, self.max_skip)
        reader.epoch = self.epoch
        return reader.epoch_samples()
