"""The dK/dV pass's work plan: the one-launch kernel against its PyTorch reference."""
import pytest
import torch

pytest.importorskip("triton")

import d3ds2.kernels.span_work as span_work  # noqa: E402


def _plan_inputs(gen, n_spans, n_keys, hi, n_queries):
    cuts = torch.randint(0, n_keys + 1, (n_spans - 1,), generator=gen).sort().values  # empty spans included
    soff = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_keys])]).int()
    counts = torch.randint(0, n_queries, (hi * n_spans,), generator=gen)
    counts[1::5] = 0  # spans nobody selected
    poff = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).int()
    return soff, poff


@pytest.mark.parametrize("n_spans,n_keys,block_kv,hkv,hi,per_item,block", [
    (7, 300, 16, 2, 2, 5, 1024),   # one program step per sweep
    (40, 900, 16, 3, 1, 7, 16),    # spans, slots and items over several steps (carries)
    (1, 50, 64, 1, 1, 1, 16),      # a single span
    (25, 400, 32, 2, 2, 1000, 8),  # one item per slot
])
def test_work_plan_kernel_matches_reference(gen, monkeypatch, n_spans, n_keys, block_kv, hkv, hi, per_item, block):
    monkeypatch.setattr(span_work, "PLAN_BLOCK", block)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through the Triton interpreter
    soff, poff = (t.to(device) for t in _plan_inputs(gen, n_spans, n_keys, hi, 60))
    got = span_work.work_plan(soff, poff, n_keys, block_kv, hkv, per_item)
    ref = span_work.work_plan_reference(soff, poff, n_keys, block_kv, hkv, per_item)
    for name, a, b in zip(("ch_span", "ch_start", "cum_items"), got, ref):
        assert a.dtype == torch.int32 and torch.equal(a, b), name
    assert int(ref[2][-1]) > 0  # there is work to plan
