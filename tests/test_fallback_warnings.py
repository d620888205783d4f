"""Every silent fallback to a slower path warns once, with the reason and the fix (the missing library is
simulated: ``sys.modules[name] = None`` makes its import fail, as on a machine without it)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import trimesh

import d3ds2.fallbacks as fallbacks
from d3ds2.fallbacks import SlowPathWarning


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts as a new process would: nothing warned yet."""
    monkeypatch.setattr(fallbacks, "_warned", set())


def _one_warning(record, *needles: str) -> str:
    msgs = [str(w.message) for w in record if issubclass(w.category, SlowPathWarning)]
    assert len(msgs) == 1, msgs
    for needle in needles:
        assert needle in msgs[0], (needle, msgs[0])
    return msgs[0]


def test_sdf_auto_without_open3d_warns_once_and_uses_torch(monkeypatch):
    from d3ds2.geometry.sparse_sdf import surface_distance
    from d3ds2.geometry.torch_distance import TorchSurfaceDistance

    monkeypatch.setitem(sys.modules, "open3d", None)
    box = trimesh.creation.box()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        query = surface_distance(box.vertices, box.faces, backend="auto", device="cpu")
        surface_distance(box.vertices, box.faces, backend="auto", device="cpu")  # once per process
    _one_warning(record, "open3d", "20x slower", "pip install open3d", "sdf.backend=torch")
    assert isinstance(query, TorchSurfaceDistance)
    assert abs(float(query.unsigned(torch.tensor([[0.0, 0.0, 2.0]]).numpy())[0]) - 1.5) < 1e-5
    with warnings.catch_warnings():  # the torch backend asked for by name: a choice, no warning
        warnings.simplefilter("error", SlowPathWarning)
        monkeypatch.setattr(fallbacks, "_warned", set())
        surface_distance(box.vertices, box.faces, backend="torch", device="cpu")


def test_metrics_without_open3d_warn(monkeypatch):
    from d3ds2.geometry.metrics import closest_on_surface

    monkeypatch.setitem(sys.modules, "open3d", None)
    with pytest.warns(SlowPathWarning, match="pip install open3d") as record:
        dist, _ = closest_on_surface(trimesh.creation.box(), torch.tensor([[0.0, 0.0, 2.0]]).numpy())
    _one_warning(record)
    assert abs(float(dist[0]) - 1.5) < 1e-5


def test_watertight_without_manifold3d_warns(monkeypatch):
    from d3ds2.geometry.watertight import exact_solid

    monkeypatch.setitem(sys.modules, "manifold3d", None)
    two = trimesh.util.concatenate([trimesh.creation.box(), trimesh.creation.box().apply_translation([3, 0, 0])])
    with pytest.warns(SlowPathWarning, match="pip install manifold3d") as record:
        assert exact_solid(two) is None
    _one_warning(record)


def test_triton_missing_on_a_gpu_warns(monkeypatch):
    """'auto' on a CUDA tensor with triton not importable: the reference runs, with one warning."""
    import d3ds2.kernels.runtime as runtime

    monkeypatch.setattr(runtime, "triton", None)
    monkeypatch.setattr(runtime, "TRITON_IMPORT_ERROR", "No module named 'triton'")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.warns(SlowPathWarning, match="pip install triton") as record:
        assert runtime.auto_triton(on_gpu, "span_attention") is False
        assert runtime.auto_triton(on_gpu, "span_attention") is False
    _one_warning(record, "span_attention", "No module named 'triton'")
    with warnings.catch_warnings():  # CPU tensors: the reference is the path there, nothing to say
        warnings.simplefilter("error", SlowPathWarning)
        monkeypatch.setattr(runtime, "interpreting", lambda: False)
        assert runtime.auto_triton(torch.zeros(1), "span_attention") is False


def _varlen_inputs(d: int):
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(12, 4, d, generator=gen)
    k, v = (torch.randn(12, 2, d, generator=gen) for _ in range(2))
    return q, k, v, cu


def test_varlen_span_falls_back_with_a_warning():
    """kernel='span' with a head dim the span kernel does not take: the torch result, and one warning."""
    from d3ds2.attention.varlen import varlen_attention

    q, k, v, cu = _varlen_inputs(12)
    want = varlen_attention(q, k, v, cu, cu, 7, 7, kernel="torch")
    with pytest.warns(SlowPathWarning, match="head dim 12") as record:
        got = varlen_attention(q, k, v, cu, cu, 7, 7, kernel="span")
    _one_warning(record, "kernel='span'")
    torch.testing.assert_close(got, want)


def test_varlen_flash_on_cpu_warns_but_auto_does_not():
    from d3ds2.attention.varlen import varlen_attention

    q, k, v, cu = _varlen_inputs(16)
    with pytest.warns(SlowPathWarning, match="FlashAttention cannot run") as record:
        varlen_attention(q, k, v, cu, cu, 7, 7, kernel="flash")
    _one_warning(record, "padded PyTorch attention")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        fallbacks._warned.clear()
        varlen_attention(q, k, v, cu, cu, 7, 7, kernel="auto")  # on the CPU torch is the path, not a fallback


def test_corpus_source_missing_warns(monkeypatch, tmp_path):
    from d3ds2.geometry.corpus import real_mesh_paths

    monkeypatch.setitem(sys.modules, "pyvista", None)
    monkeypatch.setitem(sys.modules, "pyvista.examples", None)
    with pytest.warns(UserWarning, match="real=pyvista"):
        paths = real_mesh_paths(("pyvista",))
    assert paths == {}
