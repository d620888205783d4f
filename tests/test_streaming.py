"""Shards streamed through webdataset: a real HTTP server on 127.0.0.1, ranks x workers, damaged shards, resume."""
from __future__ import annotations

import csv
import functools
import http.server
import logging
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from d3ds2.data.layout import DataLayout, shard_urls
from d3ds2.data.shard_format import decode_sample, encode_sample
from d3ds2.data.shards import ShardReader, ShardStream, ShardUnreachable, TooManyDamaged, write_tar_atomic

ROOT = Path(__file__).resolve().parents[1]


def tiny_sample(key: str) -> dict:
    return {"key": key, "meta": {"k": key}, "sdf": {}}


def write_shards(folder: Path, split: str, n_shards: int, per_shard: int, make=tiny_sample) -> list[str]:
    layout = DataLayout(str(folder))
    os.makedirs(layout.shards_dir, exist_ok=True)
    keys = []
    for i in range(n_shards):
        samples = [make(f"{split}{i:02d}_{j}") for j in range(per_shard)]
        write_tar_atomic(layout.shard(split, 0, i), [encode_sample(s) for s in samples])
        keys += [s["key"] for s in samples]
    return keys


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on the loopback address serving ``tmp_path`` (yields (folder, base URL))."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _keys_of_rank(urls, rank: int, epoch: int) -> list[str]:
    stream = ShardStream(urls, shuffle_buffer=4, seed=3, with_views=False, rank=rank, world_size=2)
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda s: s["key"])
    return list(loader)


def test_http_stream_two_ranks_two_workers_each_sample_once_per_epoch(http_root):
    folder, base = http_root
    keys = write_shards(folder, "train", n_shards=8, per_shard=3)
    write_shards(folder, "val", n_shards=1, per_shard=2)  # another split in the same folder: never read as train
    urls = shard_urls(f"{base}/shards/train-rank000-{{00000..00007}}.tar", "train")
    assert len(urls) == 8 and urls[0].startswith("http://127.0.0.1")
    orders = []
    for epoch in (0, 1):
        got = _keys_of_rank(urls, 0, epoch) + _keys_of_rank(urls, 1, epoch)
        assert sorted(got) == sorted(keys), f"epoch {epoch}: each sample once over 2 ranks x 2 workers"
        orders.append(got)
    assert orders[0] != orders[1]  # the shard order and the buffer are reshuffled per epoch
    # a pipe: command is a source too
    piped = ShardStream([f"pipe:cat {folder / 'shards' / 'val-rank000-00000.tar'}"], with_views=False, rank=0,
                        world_size=1)
    assert sorted(s["key"] for s in piped) == ["val00_0", "val00_1"]
    # resampling: shards drawn with replacement, still only this split's samples
    reader = ShardReader(urls, 0, 4, lambda raw: raw["__key__"], seed=0, resample=True)
    drawn = list(reader.epoch_samples())
    assert len(drawn) == 2 * 3 and set(drawn) <= set(keys)


def test_unanswered_url_and_empty_split_are_clear_errors(http_root, tmp_path):
    folder, base = http_root
    write_shards(folder, "train", n_shards=1, per_shard=1)
    missing = ShardStream([f"{base}/shards/train-rank000-00042.tar"], with_views=False, rank=0, world_size=1)
    with pytest.raises(ShardUnreachable, match=r"train-rank000-00042\.tar"):
        list(missing)
    with socket_closed() as port:
        dead = ShardStream([f"http://127.0.0.1:{port}/train-0.tar"], with_views=False, rank=0, world_size=1)
        with pytest.raises(ShardUnreachable, match=f"127.0.0.1:{port}/train-0.tar"):
            list(dead)
    with pytest.raises(FileNotFoundError, match=r"no shards of split 'val' in .*shards \(expected val-\*\.tar; "
                                                r"found only \['train-rank000-00000.tar'\]\)"):
        shard_urls(str(folder / "shards"), "val", hint="run data_prep")


class socket_closed:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc) -> None:
        pass


def _offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar]


def damage(folder: Path) -> dict[str, str]:
    """Four shards of 3 samples ({a,b,c}{0,1,2}), each member 2 entries, damaged in a different way; returns the
    kind of damage of each shard and writes an intact fifth one."""
    layout = DataLayout(str(folder))
    os.makedirs(layout.shards_dir, exist_ok=True)
    kinds = {}
    for i, kind in enumerate(["truncated", "flipped_byte", "bad_header", "member_boundary", "intact"]):
        path = Path(layout.shard("train", 0, i))
        samples = [{"key": f"{kind}{j}", "meta": {}, "sdf": {32: {
            "cells": np.arange(6).reshape(2, 3).astype(np.int32), "sdf": np.zeros((2, 8, 8, 8), np.float32),
            "sharp": np.zeros((2, 8, 8, 8), bool), "band": 4.0, "trunc": 7.9375}}} for j in range(3)]
        write_tar_atomic(str(path), [encode_sample(s) for s in samples])
        data, offs = bytearray(path.read_bytes()), _offsets(path)  # members: k0.meta, k0.sdf32, k1.meta, ...
        if kind == "truncated":  # cut inside sample 1's SDF entry
            data = data[: offs[3] + 512 + 50]
        elif kind == "flipped_byte":  # one byte of sample 1's compressed SDF
            data[offs[3] + 512 + 100] ^= 0xFF
        elif kind == "bad_header":  # the checksum of the header of sample 1's first entry
            data[offs[2] + 150] ^= 0x01
        elif kind == "member_boundary":  # cut right after sample 0
            data = data[: offs[2]]
        path.write_bytes(bytes(data))
        kinds[str(path)] = kind
    return kinds


def test_damaged_shards_are_skipped_named_counted_and_limited(tmp_path, caplog):
    kinds = damage(tmp_path)
    urls = shard_urls(str(tmp_path / "shards"), "train")
    reader = ShardReader(urls, 0, 1, lambda raw: decode_sample(raw, with_views=False)["key"], shuffle_buffer=0,
                         max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        got = list(reader.epoch_samples())
    # what survives: everything before the damage, and what lies after a bad header or a flipped byte
    assert sorted(got) == ["bad_header0", "bad_header2", "flipped_byte0", "flipped_byte2", "intact0", "intact1",
                           "intact2", "member_boundary0", "truncated0"]
    text = caplog.text
    for path, kind in kinds.items():
        if kind != "intact":
            assert f"damaged shard {path}" in text, kind
    assert "sample truncated1" in text and "sample flipped_byte1" in text and "sample bad_header1" in text
    assert "no end-of-archive blocks" in text and "corrupted tar header" in text
    assert "epoch 0, reader 0/1: 4 damaged samples skipped of 13" in text  # 3 samples lost + 1 shard tail
    # the limit: the same shards with max_skip_fraction 0.1 stop the epoch with a clear message
    strict = ShardReader(urls, 0, 1, lambda raw: raw["__key__"], shuffle_buffer=0, max_skip_fraction=0.1)
    with pytest.raises(TooManyDamaged, match=r"of epoch 0 were damaged .*max_skip_fraction=0.1"):
        list(strict.epoch_samples())


def test_reader_position_resumes_the_same_samples(tmp_path):
    write_shards(tmp_path, "train", n_shards=5, per_shard=4)
    urls = shard_urls(str(tmp_path / "shards"), "train")
    straight = ShardReader(urls, 1, 2, lambda raw: raw["__key__"], seed=5, shuffle_buffer=3)
    it = straight.samples()
    want = [next(it) for _ in range(25)]  # runs into epoch 2 (10 samples per epoch for this reader)
    first = ShardReader(urls, 1, 2, lambda raw: raw["__key__"], seed=5, shuffle_buffer=3)
    it = first.samples()
    head = [next(it) for _ in range(13)]
    resumed = ShardReader(urls, 1, 2, lambda raw: raw["__key__"], seed=5, shuffle_buffer=3)
    resumed.restore(first.state())
    it = resumed.samples()
    assert head + [next(it) for _ in range(12)] == want


def _train(tmp_path: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "experiment=vae_tiny", f"paths.root_dir={tmp_path}", f"run_name={run}",
           "logger=csv", "callbacks.progress_bar.refresh_rate=0", f"data.train_shards={tmp_path / 'data' / 'shards'}",
           "data.resolutions=[16,24]", "data.val_resolution=24", "data.max_skip_fraction=0.5", "data.shuffle_buffer=3",
           "trainer.limit_val_batches=1", "trainer.val_check_interval=3",
           "callbacks.model_checkpoint.every_n_train_steps=3", "model.val_meshes=0", "model.render_meshes=0", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_vae_tiny_on_shards_resumes_bit_identically_after_kill_9(tmp_path):
    """vae_tiny on shards (one of them damaged): killed with SIGKILL at step 3, resumed from last.ckpt, it ends
    with exactly the weights of an uninterrupted run; the damaged samples are counted in the logged metrics."""
    from test_encode_latents import sphere_sample

    write_shards(tmp_path / "data", "train", n_shards=3, per_shard=3,
                 make=lambda key: {**sphere_sample(key, res=32, radius=0.3 + 0.05 * int(key[-1]), views=0),
                                   "views": None})
    damaged = Path(DataLayout(str(tmp_path / "data")).shard("train", 0, 1))
    damaged.write_bytes(damaged.read_bytes()[: _offsets(damaged)[2]])  # cut after its first sample
    straight = _train(tmp_path, "straight", "trainer.max_steps=6")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train(tmp_path, "resumed", "trainer.max_steps=6", "+callbacks.kill._target_=ddp_helpers.KillAtStep",
                    "+callbacks.kill.step=3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = tmp_path / "logs" / "vae_tiny"
    assert torch.load(run / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = _train(tmp_path, "resumed", "trainer.max_steps=6", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(run / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    assert b["VAEDataModule"]["readers"] == a["VAEDataModule"]["readers"]
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), f"weights differ after resume: {k}"
    for k, v in a["ema"].items():
        assert torch.equal(b["ema"][k], v), f"EMA differs after resume: {k}"
    rows = [r for r in csv.DictReader(open(next((run / "straight").rglob("metrics.csv")))) if r.get("data/skipped_samples")]
    assert rows and float(rows[-1]["data/skipped_samples"]) >= 1
    assert f"damaged shard {damaged}" in straight.stderr + straight.stdout


def test_latent_stream_resumes_with_two_workers(tmp_path):
    """The DiT data module's position (2 loader workers, role rotation) restarts the stream at the next batch."""
    from d3ds2.data.latent_shards import write_latent_shard
    from d3ds2.training.dit_datamodule import LatentDataModule

    rng = np.random.default_rng(0)
    for i in range(4):
        write_latent_shard(str(tmp_path / f"train-rank000-{i:05d}.tar"), [
            {"key": f"k{i}_{j}", "coords": rng.integers(0, 8, (3 + j, 3)), "feats": rng.normal(size=(3 + j, 2)),
             "resolution": 64, "images": rng.integers(0, 255, (3, 4, 4, 4), dtype=np.uint8)} for j in range(3)])

    def module():
        return LatentDataModule(str(tmp_path), None, batch_tokens=9, max_batch=2, num_workers=2, seed=1,
                                shuffle_buffer=2)

    def take(dm, n):
        it = iter(dm.train_dataloader())
        out = [dm.on_before_batch_transfer(next(it), 0) for _ in range(n)]
        return [(b["keys"], b["images"]) for b in out]

    want = take(module(), 11)
    first = module()
    head = take(first, 5)
    state = first.state_dict()
    assert state["batch"] == 4 and state["workers"] == 2 and set(state["readers"]["0"]) == {"0", "1"}
    resumed = module()
    resumed.load_state_dict(state)
    got = head + take(resumed, 6)
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))  # the same views drawn


def test_vae_tiny_on_shards_two_ranks_saves_both_positions(tmp_path):
    """train.py under DDP (2 gloo ranks) on shards: each rank reads its own shards and the checkpoint holds the
    stream position of both (gathered at save time)."""
    from test_encode_latents import sphere_sample

    write_shards(tmp_path / "data", "train", n_shards=4, per_shard=2,
                 make=lambda key: {**sphere_sample(key, res=32, radius=0.3 + 0.05 * int(key[-1]), views=0),
                                   "views": None})
    done = _train(tmp_path, "ddp", "trainer.max_steps=4", "trainer=ddp", "trainer.accelerator=cpu",
                  "trainer.devices=2", "trainer.precision=32")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "logs" / "vae_tiny" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    position = ckpt["VAEDataModule"]
    assert position["world"] == 2 and set(position["readers"]) == {"0", "1"}
    assert all((r["0"]["epoch"], r["0"]["offset"]) > (0, 0) for r in position["readers"].values())  # both moved on
