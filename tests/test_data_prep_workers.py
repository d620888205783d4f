"""Data prep against dying processes (issue 28): a worker killed by a real SIGKILL mid-mesh, the driver killed
by SIGKILL (its workers must not outlive it), a transient PermissionError, unsupported files counted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d3ds2.data.prep import run
from d3ds2.geometry.corpus import procedural_shape
from test_data_prep import _cfg

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    """Live (non-zombie) direct children of ``pid``, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def meshes(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        procedural_shape(i).export(d / f"csg_{i}.obj")
    (d / "notes.txt").write_text("not a mesh")
    (d / "scene.fbx").write_bytes(b"\0" * 16)
    (d / "sub").mkdir()
    (d / "sub" / "other.FBX").write_bytes(b"\0" * 16)
    return d


def start_prep(inp: Path, out: Path, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "data_prep", f"input={inp}", f"output={out}", "resolutions=[64]", "views=0",
           f"workers={workers}", "progress=false", "watertight.resolution=64", "samples_per_shard=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_worker_killed_mid_mesh_is_recorded_and_the_run_goes_on(meshes, tmp_path):
    out = tmp_path / "out"
    proc = start_prep(meshes, out, workers=1)
    try:
        (worker,) = wait_for(lambda: children(proc.pid), 120, "the worker process")
        time.sleep(0.5)  # it holds a mesh (each takes a second or more)
        os.kill(worker, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("\n{\n") :])  # the JSON summary ends the output (logs before it)
    assert summary["ok"] == 2 and summary["crashed_now"] == 1 and summary["shards"] == 1, summary
    assert summary["unsupported_files"] == {".fbx": 2, ".txt": 1}
    records = [json.loads(line) for line in open(out / "manifest" / "rank000.jsonl")]
    (failed,) = [r for r in records if r["status"] == "failed"]
    assert failed["signal"] == "SIGKILL" and failed["retryable"] and "killed by signal SIGKILL" in failed["reason"]
    ok_sources = {r["source"] for r in records if r["status"] == "ok"}
    assert failed["source"] not in ok_sources and len(ok_sources | {failed["source"]}) == 3  # the one it held
    # a re-run does not try it again (a mesh that kills its worker would kill every re-run) ...
    again = run(_cfg(meshes, out, views=0, resolutions=[64]), progress=False)
    assert again["processed"] == 0 and again["ok"] == 2
    # ... unless asked to
    retried = run(_cfg(meshes, out, views=0, resolutions=[64], retry_failed=True), progress=False)
    assert retried["processed"] == 1 and retried["ok"] == 3 and retried["failed_now"] == 0


def test_killed_driver_leaves_no_orphan_workers(meshes, tmp_path):
    proc = start_prep(meshes, tmp_path / "out", workers=2)
    try:
        workers = wait_for(lambda: len(children(proc.pid)) == 2 and children(proc.pid), 120, "two workers")
        time.sleep(1.0)  # both are mid-mesh
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not any(alive(w) for w in workers), 10, "the orphaned workers to exit")
    finally:
        proc.kill()
        proc.stdout.close()  # not communicate(): orphans would hold the pipes open
        proc.stderr.close()
        for w in workers if "workers" in locals() else []:
            if alive(w):
                os.kill(w, signal.SIGKILL)


def _make_unreadable(path: Path) -> None:
    """A mesh path whose open() fails with a real EACCES, also for root (a write-only sysctl file)."""
    if os.geteuid() != 0:
        procedural_shape(0).export(path)
        path.chmod(0)
    else:
        target = Path("/proc/sys/vm/compact_memory")
        if not target.exists():
            pytest.skip("needs a write-only sysctl file to make EACCES as root")
        path.symlink_to(target)


def test_transient_failure_is_retryable(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    procedural_shape(1).export(inp / "fine.obj")
    blocked = inp / "blocked.obj"
    _make_unreadable(blocked)
    out = tmp_path / "out"
    first = run(_cfg(inp, out, views=0, resolutions=[64]), progress=False)
    assert first["ok"] == 1 and first["failed_now"] == 1 and first["crashed_now"] == 0, first
    (rec,) = [json.loads(line) for line in open(out / "manifest" / "rank000.jsonl") if '"failed"' in line]
    assert rec["retryable"] and rec["reason"].startswith("PermissionError"), rec
    blocked.unlink()  # the permission problem is fixed
    procedural_shape(2).export(blocked)
    assert run(_cfg(inp, out, views=0, resolutions=[64]), progress=False)["processed"] == 0
    retried = run(_cfg(inp, out, views=0, resolutions=[64], retry_failed=True), progress=False)
    assert retried["processed"] == 1 and retried["ok"] == 2
