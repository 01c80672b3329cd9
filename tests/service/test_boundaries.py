"""The two sides share only the model format: the service never imports torch or training, and
training never imports the service."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _foreign_imports(package: str, foreign: tuple[str, ...]) -> tuple[int, str]:
    """Import every module of ``package`` in a fresh interpreter; list the foreign ones loaded."""
    modules = sorted(
        ".".join((package, *path.relative_to(ROOT / package).with_suffix("").parts))
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py"
    )
    program = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name.removesuffix('.__init__'))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {foreign!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return len(modules), done.stdout.strip()


def test_service_imports_neither_torch_nor_training() -> None:
    count, foreign = _foreign_imports("service", ("torch", "training"))
    assert count > 20  # every module of the package was imported
    assert foreign == "[]"


def test_training_does_not_import_the_service() -> None:
    count, foreign = _foreign_imports("training", ("service", "fastapi", "uvicorn"))
    assert count > 10
    assert foreign == "[]"


def _service_imports(path: Path) -> set[str]:
    """Every ``service.*`` module a file imports, type-only imports included."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("service"))
    return found


def _engine_modules() -> dict[str, Path]:
    engine = ROOT / "service" / "engine"
    return {
        ".".join(("service", *p.relative_to(ROOT / "service").with_suffix("").parts)).removesuffix(
            ".__init__"
        ): p
        for p in engine.rglob("*.py")
    }


def test_the_engine_imports_no_protocol_layer() -> None:
    allowed = ("service.engine", "service.settings")
    for name, path in _engine_modules().items():
        outside = {m for m in _service_imports(path) if not m.startswith(allowed)}
        assert not outside, f"{name} imports {sorted(outside)}"


def test_engine_modules_form_no_import_cycle() -> None:
    modules = _engine_modules()
    graph = {
        name: {m for m in _service_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    graph = {
        name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join((*trail, name))
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())
