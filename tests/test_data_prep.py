"""End-to-end data prep: shard round trip, bad inputs, resume, readers, model tensors."""
import errno
import glob
import json
import tarfile
import os

import numpy as np
import pytest
import trimesh
from omegaconf import OmegaConf

from d3ds2.data.shard_format import SDF_STEP, decode_sample, encode_sample, sample_to_tensors
from d3ds2.data.shards import ShardStream, read_tar, shards_for
from d3ds2.geometry.corpus import procedural_shape
from d3ds2.data.prep import OutputError, run


def _cfg(inp, out, **kw):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "d3ds2", "configs", "data_prep", "config.yaml"))
    cfg.pop("hydra")
    cfg.merge_with({"input": str(inp), "output": str(out), "resolutions": [64], "views": 2, "workers": 1,
                    "samples_per_shard": 2, "render": {"size": 64}, "watertight": {"resolution": 64}, **kw})
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("meshes")
    for i in range(3):
        procedural_shape(i).export(d / f"csg_{i}.obj")
    box = trimesh.creation.box((1, 1, 1))
    trimesh.Trimesh(box.vertices, box.faces[:-2], process=False).export(d / "open_box.ply")  # not watertight
    (d / "corrupt.obj").write_text("v 0 0 0\nf 1 2 3 garbage\nthis is not a mesh\n")
    (d / "empty.stl").write_bytes(b"")
    (d / "nan.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (d / "degenerate.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    return d


def test_run_round_trip_bad_inputs_and_resume(corpus, tmp_path):
    out = tmp_path / "out"
    summary = run(_cfg(corpus, out), progress=False)
    assert summary["ok"] == 4 and summary["skipped_now"] == 4, summary
    records = [json.loads(l) for l in open(out / "manifest" / "rank000.jsonl")]
    reasons = {os.path.basename(r["source"]): r.get("reason") for r in records if r["status"] == "skipped"}
    assert set(reasons) == {"corrupt.obj", "empty.stl", "nan.obj", "degenerate.obj"}
    assert all(reasons.values())
    shards = sorted(glob.glob(str(out / "shards" / "*.tar")))
    assert [os.path.basename(s) for s in shards] == ["train-rank000-00000.tar", "train-rank000-00001.tar"]
    assert summary["splits"] == {"train": 4, "val": 0}  # val_fraction 0.05 of 4 meshes: none hashed to val here
    assert len(shards) == 2 and not glob.glob(str(out / "**" / "*.tmp*"), recursive=True)
    samples = [decode_sample(raw) for s in shards for raw in read_tar(s)]
    assert len(samples) == 4
    for s in samples:
        sdf = s["sdf"][64]
        assert sdf["sdf"].shape == (len(sdf["cells"]), 8, 8, 8) and (np.abs(sdf["sdf"]) < sdf["band"]).any()
        assert s["views"]["rgba"].shape == (2, 64, 64, 4) and s["views"]["extrinsics"].shape == (2, 4, 4)
        assert s["meta"]["sha256"] and s["meta"]["stats"]["voxels"]["64"]["cells"] == len(sdf["cells"])
    assert any(s["sdf"][64]["sharp"].any() for s in samples)
    # resume: nothing is redone
    again = run(_cfg(corpus, out), progress=False)
    assert again["processed"] == 0 and again["already_done"] == 8 and again["ok"] == 4
    # a sample lost from the cache (killed before the rename) is redone, and only it
    os.remove(glob.glob(str(out / "samples" / "*.tar"))[0])
    assert run(_cfg(corpus, out), progress=False)["processed"] == 1


def test_partition_over_machines(corpus, tmp_path):
    a = run(_cfg(corpus, tmp_path / "o", rank=0, world_size=2, views=0), progress=False)
    b = run(_cfg(corpus, tmp_path / "o", rank=1, world_size=2, views=0), progress=False)
    assert a["inputs"] + b["inputs"] == 8 and a["ok"] + b["ok"] == 4


def test_unwritable_output(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not writable"):
        run(_cfg(corpus, blocker / "out"), progress=False)


def test_too_many_faces_is_skipped_with_reason(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    procedural_shape(0).export(inp / "small.obj")  # 926 faces
    trimesh.creation.icosphere(6).export(inp / "large.ply")  # 81,920 faces: stands in for a 5M-face mesh
    out = tmp_path / "out"
    summary = run(_cfg(inp, out, max_faces=50_000, views=0, resolutions=[32]), progress=False)
    assert summary["ok"] == 1 and summary["skipped_now"] == 1, summary
    (reason,) = summary["reasons"].values()
    assert "81920 faces > max_faces=50000" in reason
    records = [json.loads(l) for l in open(out / "manifest" / "rank000.jsonl")]
    assert {os.path.basename(r["source"]): r["status"] for r in records} == {"small.obj": "ok", "large.ply": "skipped"}


def test_disk_full_stops_with_clear_error_and_no_half_written_sample(corpus, tmp_path, monkeypatch):
    """The first entry of a sample tar is written, the second hits ENOSPC (the pool forks, so workers see it)."""
    original = tarfile.TarFile.addfile

    def addfile_until_full(self, info, fileobj=None):
        if getattr(self, "_entries_written", 0) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._entries_written = 1
        return original(self, info, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile_until_full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left on device.*free space"):
        run(_cfg(corpus, out, views=0, resolutions=[32]), progress=False)
    left = [os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert not [p for p in left if p.endswith(".tar") or ".tmp" in p], left  # nothing that looks like a sample
    records = [json.loads(l) for l in open(out / "manifest" / "rank000.jsonl")] if "manifest/rank000.jsonl" in left else []
    assert not [r for r in records if r["status"] == "ok"]


def test_encode_decode_and_tensors():
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 16, (5, 3)).astype(np.int32)
    sdf = rng.uniform(-9, 9, (5, 8, 8, 8)).astype(np.float32)
    sharp = rng.random((5, 8, 8, 8)) < 0.1
    sample = {"key": "k", "meta": {"a": 1}, "sdf": {128: {"cells": cells, "sdf": sdf, "sharp": sharp,
                                                          "band": 4.0, "trunc": 7.9375}}}
    back = decode_sample(encode_sample(sample))
    s = back["sdf"][128]
    assert (s["cells"] == cells).all() and (s["sharp"] == sharp).all() and back["meta"] == {"a": 1}
    assert np.abs(s["sdf"] - np.clip(sdf, -7.9375, 7.9375)).max() <= SDF_STEP / 2 + 1e-6
    t = sample_to_tensors(back, 128)
    assert t["coords"].shape == (5 * 512, 3) and t["sdf"].shape == (5 * 512,)
    assert (t["in_band"].numpy() == (np.abs(t["sdf"].numpy()) < 4)).all() and t["sharp"].sum() == sharp.sum()
    assert (t["coords"].numpy()[:512] // 8 == cells[0]).all()


def test_stream_splits_ranks_and_workers(tmp_path):
    from d3ds2.data.shards import write_tar_atomic

    urls = []
    for i in range(4):
        sample = {"key": f"s{i}", "meta": {}, "sdf": {}}
        p = str(tmp_path / f"shard{i}.tar")
        write_tar_atomic(p, [encode_sample(sample)])
        urls.append(p)
    parts = [shards_for(urls, r * 2 + w, 4) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == sorted(urls)
    keys = [s["key"] for r in range(2) for s in ShardStream(urls, shuffle_buffer=2, rank=r, world_size=2)]
    assert sorted(keys) == ["s0", "s1", "s2", "s3"]
    e0 = [s["key"] for s in ShardStream(urls, shuffle_buffer=4, seed=1, rank=0, world_size=1)]
    assert sorted(e0) == ["s0", "s1", "s2", "s3"]


def test_split_is_deterministic_stable_and_pinnable(tmp_path):
    from d3ds2.data.splits import assign_split, hashed_split, read_split_file, split_name

    names = [f"meshes/part{i:04d}.obj" for i in range(4000)]
    first = {n: hashed_split(n, 0.1) for n in names}
    assert 0.08 < sum(v == "val" for v in first.values()) / len(names) < 0.12  # val_fraction honoured
    # adding meshes (and listing them in another order) moves none of the others
    more = names[::-1] + [f"new/extra{i}.obj" for i in range(500)]
    assert all(hashed_split(n, 0.1) == first[n] for n in more if n in first)
    # a larger val_fraction only moves train meshes to val, never back
    assert all(hashed_split(n, 0.2) == "val" for n in names if first[n] == "val")
    # the name is relative to the input folder: the same corpus elsewhere keeps its split
    a, b = tmp_path / "a" / "x" / "m.obj", tmp_path / "b" / "x" / "m.obj"
    assert split_name(str(a), str(tmp_path / "a")) == split_name(str(b), str(tmp_path / "b")) == "x/m.obj"
    # a split file pins chosen meshes by relative path, file name or key
    val_name = next(n for n in names if first[n] == "val")
    pins = tmp_path / "split.txt"
    pins.write_text(f"# pinned\ntrain {val_name}\nval part0003.obj\nval abcdef0123456789\n")
    pinned = read_split_file(str(pins))
    root = str(tmp_path)
    assert assign_split(os.path.join(root, val_name), "k1", root, 0.1, pinned) == "train"
    assert assign_split(os.path.join(root, "meshes/part0003.obj"), "k2", root, 0.1, pinned) == "val"
    assert assign_split(os.path.join(root, "other/z.obj"), "abcdef0123456789", root, 0.0, pinned) == "val"
    pins.write_text("test foo.obj\n")
    with pytest.raises(ValueError, match="split.txt:1.*'train NAME' or 'val NAME'"):
        read_split_file(str(pins))
    with pytest.raises(ValueError, match="val_fraction"):
        hashed_split("m.obj", 1.0)


def test_prep_writes_split_named_shards(corpus, tmp_path):
    """A pinned mesh lands in val-rank000-*.tar, the rest in train; re-running with more meshes keeps both."""
    pins = tmp_path / "split.txt"
    pins.write_text("val csg_1.obj\n")
    out = tmp_path / "out"
    summary = run(_cfg(corpus, out, views=0, resolutions=[32], split_file=str(pins)), progress=False)
    assert summary["splits"] == {"train": 3, "val": 1}
    names = sorted(os.path.basename(p) for p in glob.glob(str(out / "shards" / "*.tar")))
    assert names == ["train-rank000-00000.tar", "train-rank000-00001.tar", "val-rank000-00000.tar"]
    (val,) = read_tar(str(out / "shards" / "val-rank000-00000.tar"))
    assert decode_sample(val)["meta"]["source"].endswith("csg_1.obj")
    from d3ds2.data.layout import shard_urls

    with pytest.raises(FileNotFoundError, match=r"no shards of split 'val' in .*empty.*val-\*\.tar"):
        os.makedirs(tmp_path / "empty")
        shard_urls(str(tmp_path / "empty"), "val")


def test_mixed_folder_records_each_watertight_path(tmp_path):
    """Closed solid, cut-open sphere (a solid by winding number) and an open sheet: each takes its path, and
    the manifest says which and why."""
    inp = tmp_path / "in"
    inp.mkdir()
    procedural_shape(0).export(inp / "closed.obj")
    sphere = trimesh.creation.icosphere(3, 0.7)
    keep = sphere.triangles_center[:, 2] < 0.3
    trimesh.Trimesh(sphere.vertices, sphere.faces[keep]).export(inp / "cut_sphere.ply")
    slab = trimesh.creation.box((1.6, 1.2, 1e-3))
    trimesh.Trimesh(slab.vertices, slab.faces[slab.triangles_center[:, 2] > 0]).export(inp / "sheet.ply")
    out = tmp_path / "out"
    summary = run(_cfg(inp, out, views=0, resolutions=[32]), progress=False)
    assert summary["ok"] == 3, summary["reasons"]
    records = {os.path.basename(r["source"]): r for r in map(json.loads, open(out / "manifest" / "rank000.jsonl"))}
    paths = {name: r["watertight"]["mode"] for name, r in records.items()}
    assert paths == {"closed.obj": "closed", "cut_sphere.ply": "winding", "sheet.ply": "rebuild"}, records
    assert records["cut_sphere.ply"]["watertight"]["decisive_fraction"] > 0.9
    assert "open sheet" in records["sheet.ply"]["watertight"]["reason"]
    # the cut sphere is stored as a solid: its centre voxels are inside (a thin shell would call them outside)
    shards = glob.glob(str(out / "shards" / "*.tar"))
    samples = {s["meta"]["source"]: s for shard in shards for s in map(decode_sample, read_tar(shard))}
    cut = samples[str(inp / "cut_sphere.ply")]
    assert cut["meta"]["stats"]["watertight"]["mode"] == "winding"
    t = sample_to_tensors(cut, 32)
    centres, sdf = -1 + (t["coords"].numpy().astype(np.float64) + 0.5) * 2 / 32, t["sdf"].numpy()
    deep = np.abs(np.linalg.norm(centres, axis=1) - 0.55) < 0.05  # a shell of voxels well inside the ball
    deep &= centres[:, 2] < 0.0
    assert deep.sum() > 20 and (sdf[deep] < 0).all()
