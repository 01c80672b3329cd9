"""The two sides share only the model format: the service never imports torch or training, and
training never imports the service."""

from __future__ import annotations

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
