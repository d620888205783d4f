"""Installation and import hygiene: the project's packages never shadow a dependency's, whatever the working
directory (the repository root is on ``sys.path`` when its commands run from there)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter started in ``cwd`` (as a user's command would be); its last
    stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_top_level_package_shadows_a_dependency():
    """Every top-level name the project installs is its own (d3ds2, data_prep): none is also the name of an
    installed distribution's package, such as the PyPI ``kernels`` that transformers imports."""
    from importlib.metadata import packages_distributions

    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert ours == {"d3ds2", "data_prep"}, f"unexpected top-level packages at the repository root: {sorted(ours)}"
    foreign = {name: dists for name, dists in packages_distributions().items() if name in ours and set(dists) != {"d3ds2"}}
    assert not foreign, f"top-level names shared with other distributions: {foreign}"


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_pypi_kernels_and_ours_side_by_side(where, tmp_path):
    """From the repository root and from another folder: ``import kernels`` is the PyPI package (the one
    transformers needs, with ``CUDAProperties``) and ``d3ds2.kernels`` is ours."""
    pytest.importorskip("kernels")
    got = _python(
        "import json, kernels, d3ds2.kernels.span_attention as sa\n"
        "print(json.dumps({'pypi': kernels.__file__, 'has_cuda_props': hasattr(kernels, 'CUDAProperties'),"
        " 'ours': sa.__file__}))",
        ROOT if where == "root" else tmp_path)
    assert Path(got["ours"]).resolve().is_relative_to(ROOT / "d3ds2" / "kernels")
    assert Path(got["pypi"]).parent.parent.name in ("site-packages", "dist-packages"), got["pypi"]
    assert got["has_cuda_props"]


def test_image_conditioner_builds_from_repository_root():
    """The DINOv2 conditioner built through the real transformers from the repository root, as ``inference.py``
    runs: building the model imports transformers' hub-kernel integration (the PyPI ``kernels``)."""
    pytest.importorskip("transformers")
    got = _python(
        "import json, torch\n"
        "from d3ds2.models.conditioner import ImageConditioner\n"
        "c = ImageConditioner(config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,"
        " intermediate_size=64, image_size=56, patch_size=14, num_register_tokens=4), image_size=56)\n"
        "t = c(torch.rand(1, 3, 56, 56))\n"
        "print(json.dumps({'shape': list(t.shape), 'finite': bool(torch.isfinite(t).all())}))",
        ROOT)
    assert got == {"shape": [1, 1 + 4 + 16, 32], "finite": True}
