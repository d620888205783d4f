"""The layering rules, read from the imports of every module (ast, nothing imported): the library under d3ds2/
imports none of the entry points (data_prep, train, inference, evaluate, and their installed mains in
d3ds2.cli); the inference pipeline and the VAE tools import nothing from d3ds2.training; models import neither
Lightning nor Hydra."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("data_prep", "train", "inference", "evaluate")


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute dotted names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _violations(files, banned, root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)} imports {name}" for p in files for name in sorted(_imports(p, root))
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_library_imports_no_entry_point():
    library = [p for p in sorted((ROOT / "d3ds2").rglob("*.py")) if "cli" not in p.relative_to(ROOT / "d3ds2").parts]
    assert _violations(library, (*ENTRY_POINTS, "d3ds2.cli")) == []


def test_pipeline_and_vae_tools_import_nothing_from_training():
    files = [ROOT / "d3ds2" / "pipeline.py", *sorted((ROOT / "d3ds2" / "vae").rglob("*.py"))]
    assert _violations(files, ("d3ds2.training",)) == []


def test_models_import_no_lightning_or_hydra():
    files = sorted((ROOT / "d3ds2" / "models").rglob("*.py"))
    assert _violations(files, ("lightning", "pytorch_lightning", "hydra", "omegaconf")) == []


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    """The rule can fail: a module importing an entry point, relatively or not, is reported."""
    pkg = tmp_path / "d3ds2" / "vae"
    pkg.mkdir(parents=True)
    bad = pkg / "bad.py"
    bad.write_text("from ..training import vae_module\nimport data_prep.corpus\nfrom train import main\n")
    assert _violations([bad], ("d3ds2.training",), tmp_path) == ["d3ds2/vae/bad.py imports d3ds2.training",
                                                                  "d3ds2/vae/bad.py imports d3ds2.training.vae_module"]
    assert _violations([bad], ENTRY_POINTS, tmp_path) == ["d3ds2/vae/bad.py imports data_prep.corpus",
                                                         "d3ds2/vae/bad.py imports train",
                                                         "d3ds2/vae/bad.py imports train.main"]
