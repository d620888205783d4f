"""The span kernels compile for sm_90 on a CPU machine (Triton's bundled ptxas, benchmarks/kernel_sass.py)
into the code the GPU timings rely on: wgmma tensor-core instructions, no register spills in the forward,
dQ and Gluon dK/dV kernels, one exp2 per score in each kernel's inner loop, an inner loop that stays short,
and the Gluon kernel's asynchronous schedule. Runs
the tool in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled). Also: the forward
ablations of benchmarks/span_forward_ablation.py still find the kernel lines they replace."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--json"], env=env,
                         capture_output=True, text=True)
    if run.returncode and "not found" in run.stderr:
        pytest.skip(run.stderr.strip())
    assert run.returncode == 0, run.stderr[-2000:]
    return {r["kernel"]: r for r in json.loads(run.stdout)}


def test_span_kernels_use_wgmma_and_do_not_spill(rows):
    assert set(rows) == {"forward", "dQ", "dK-dV", "dK-dV (Gluon)"}
    for name, r in rows.items():
        assert r["wgmma"], name
        assert r["registers"] <= 255, name
    for name in ("forward", "dQ", "dK-dV (Gluon)"):
        assert rows[name]["spill_bytes"] == 0, name


def test_inner_loops_spend_one_exp2_per_score(rows):
    for name, r in rows.items():
        assert 0.95 <= r["exp2_per_score"] <= 1.1, name
        assert r["per_score"] < 14, name  # 10-11 now; scalar (unvectorised) loads would add about 5


def test_gluon_dkdv_issues_both_score_matmuls_before_waiting(rows):
    """The point of the Gluon kernel: S^T and dP^T (3 wgmma each with the folded columns) are in flight
    together, where the Triton loop waits after the first matmul's instructions."""
    assert rows["dK-dV (Gluon)"]["wgmma_before_wait"] >= 6
    assert rows["dK-dV"]["wgmma_before_wait"] < rows["dK-dV (Gluon)"]["wgmma_before_wait"]


def test_forward_ablations_find_their_lines(tmp_path):
    """benchmarks/span_forward_ablation.py times the forward kernel with one line replaced: each line must still
    be in the kernel (else the benchmark stops and names ABLATIONS), and the rewritten kernel must load."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import span_forward_ablation as ablation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for label, (old, new) in ablation.ABLATIONS.items():
        source = inspect.getsource(ablation.ablated_kernel(label, str(tmp_path)).fn)
        assert new in source and old not in source, label
