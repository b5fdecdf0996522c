"""The layers hold: qarm_core (the library) imports no orchestration, tracking, task or flow code;
tasks import no flows; no module reaches into another package's private names or modules; no
test module imports another test module. Every import statement counts, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) of every import statement in ``path``, with relative
    imports resolved against the file's package."""
    package = list(path.relative_to(root).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, base, a.name) for a in node.names]
    return out


def _files(folder: str, root: Path = REPO) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str:
    """``qarm_core.quantize`` for qarm_core/quantize/kmeans.py, ``qarm_core`` for qarm_core/duck.py."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _violations(folder: str, forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    return [f"{p.relative_to(root)}:{line} imports {mod}" for p in _files(folder, root)
            for line, mod, _ in _imports(p, root) if mod.split(".")[0] in forbidden]


def test_library_imports_no_orchestration_tracking_tasks_or_flows():
    assert _violations("qarm_core", ("prefect", "mlflow", "tasks", "flows", "tests", "benchmarks")) == []


def test_tasks_import_no_flows():
    assert _violations("tasks", ("flows", "tests", "benchmarks")) == []


def test_no_module_reaches_into_another_packages_private_names():
    bad = []
    for p in _files("qarm_core"):
        mine = _package_of(p)
        for line, mod, name in _imports(p):
            if not mod.startswith("qarm_core"):
                continue
            owner = ".".join(mod.split(".")[:2]) if mod.count(".") >= 1 else mod
            private_module = any(part.startswith("_") and part != "__init__" for part in mod.split("."))
            private_name = name is not None and name.startswith("_") and not name.startswith("__")
            if owner != mine and (private_module or private_name):
                bad.append(f"{p.relative_to(REPO)}:{line} imports {mod}:{name}")
    assert bad == []


def test_no_test_module_imports_another_test_module():
    bad = []
    for p in _files("tests"):
        for line, mod, name in _imports(p):
            target = f"{mod}.{name}" if name else mod
            leaf = target.split(".")
            if mod.startswith("tests") and (any(x.startswith("test_") for x in leaf) or "conftest" in leaf):
                bad.append(f"{p.relative_to(REPO)}:{line} imports {target}")
    assert bad == []


@pytest.mark.parametrize("source,want", [
    ("import mlflow\n", ["lib/x.py:1 imports mlflow"]),
    ("def f():\n    from prefect import task\n", ["lib/x.py:2 imports prefect"]),
    ("from . import mlflow_names\n", []),
    ("from qarm_core.lm import local\n", []),
])
def test_the_layer_check_sees_lazy_imports(tmp_path, source, want):
    """The checker itself: a lazy import inside a function is found like a top-level one, and a
    relative import resolves to the file's own package."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "x.py").write_text(source)
    assert _violations("lib", ("prefect", "mlflow"), tmp_path) == want
