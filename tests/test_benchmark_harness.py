"""benchmarks/harness.py (timing, outputs) and run_all's table replacement, on the CPU."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402
import run_all  # noqa: E402


def test_median_ms_times_the_call_and_resets_grads():
    import torch

    x = torch.ones(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None  # reset before every call
        calls.append(1)
        time.sleep(0.004)
        (x * 2).sum().backward()

    ms = harness.median_ms(fn, warmup=2, iters=5, grad_to_none=[x])
    assert len(calls) == 7 and 3.5 <= ms < 200


def test_write_outputs_writes_json_and_markdown(tmp_path):
    table = harness.markdown_table(["a", "b"], [[1, "x"], [2, "y"]])
    md = harness.write_outputs(str(tmp_path), "demo", table, {"rows": [1, 2]})
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["rows"] == [1, 2] and data["device"] == harness.device_line() and data["date"]
    assert (tmp_path / "demo.md").read_text() == md and md.endswith("| 2 | y |\n") and data["command"] in md


def test_replace_block_keeps_the_prose_and_names_a_missing_marker():
    doc = "intro\n<!-- generated: ssa -->\nold table\n<!-- /generated: ssa -->\nafter\n"
    new = run_all.replace_block(doc, "ssa", "new table\n")
    assert new == "intro\n<!-- generated: ssa -->\nnew table\n<!-- /generated: ssa -->\nafter\n"
    with pytest.raises(KeyError, match="generated: dit_step"):
        run_all.replace_block(doc, "dit_step", "x")


def test_every_maintained_benchmark_has_its_block_in_the_docs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    for name in run_all.BENCHMARKS:
        run_all.replace_block(doc, name, "")
        assert (Path(run_all.ROOT) / run_all.BENCHMARKS[name][0]).is_file()
