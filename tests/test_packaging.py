"""Installation and import hygiene: the project's packages never shadow a dependency's, whatever the working
directory (the repository root is on ``sys.path`` when its commands run from there)."""
import json
import os
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


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """d3ds2 built from a copy of the checkout (the build writes build/ beside its sources) and installed
    non-editable (``pip install .``) into a folder of its own; the dependencies are the current environment's."""
    import shutil

    source, target = tmp_path_factory.mktemp("source") / "d3ds2", tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "logs",
                                                                "demo_out", ".whl", ".dev", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return target


def _installed_run(installed: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_non_editable_install_runs_from_any_directory(installed, tmp_path):
    """The installed package (configs shipped as package data) trains ``experiment=toy``, runs data prep and
    composes the inference config from a folder that is not the checkout."""
    where = _installed_run(installed, [sys.executable, "-c", "import d3ds2, d3ds2.configs; print(d3ds2.__file__)"], tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    train = _installed_run(installed, [str(installed / "bin" / "d3ds2-train"), "experiment=toy", "trainer.max_steps=2",
                                       "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
                                       "logger=csv", "run_name=pkg", f"paths.root_dir={tmp_path}"], tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "logs" / "toy" / "pkg" / "checkpoints" / "last.ckpt").is_file()
    import trimesh

    (tmp_path / "meshes").mkdir()
    trimesh.creation.box((1.0, 0.8, 0.6)).export(tmp_path / "meshes" / "box.obj")
    prep = _installed_run(installed, [sys.executable, "-m", "data_prep", f"input={tmp_path / 'meshes'}",
                                      f"output={tmp_path / 'data'}", "resolutions=[16]", "views=0", "workers=1",
                                      "watertight.resolution=32", "progress=false", "val_fraction=0"], tmp_path)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert json.loads(prep.stdout[prep.stdout.index("{"):])["ok"] == 1
    infer = _installed_run(installed, [str(installed / "bin" / "d3ds2-inference"), "--cfg", "job", "image=x.png"], tmp_path)
    assert infer.returncode == 0 and "pretrained" in infer.stdout, infer.stderr[-3000:]
