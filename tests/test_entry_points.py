"""The Hydra entry points of the corpus and VAE tools run as real processes (`python -m ...` from the repository
root, key=value overrides) and report bad input with exit status 2 and a message naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_corpus_cli_writes_meshes_and_rejects_unknown_sources(tmp_path):
    done = _run("-m", "data_prep.corpus", f"out={tmp_path / 'm'}", "n_procedural=2", "seed=3", "real=[]")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["csg_0003.obj", "csg_0004.obj"]
    assert "wrote 2 meshes" in done.stdout
    bad = _run("-m", "data_prep.corpus", f"out={tmp_path / 'n'}", "real=[nowhere]")
    assert bad.returncode == 2 and "nowhere" in bad.stderr


def test_vae_cli_rejects_an_unknown_command(tmp_path):
    bad = _run("-m", "d3ds2.vae", "command=compress", f"input={tmp_path / 'x.obj'}", f"ckpt={tmp_path / 'c.ckpt'}")
    assert bad.returncode == 2 and "command=compress" in bad.stderr and "reconstruct" in bad.stderr
