"""The documentation runs: every marked block of the README and the docs, against real servers.

See ``runnable.py`` for the markers. Each page runs in its own scratch folder with its own
servers on free loopback ports, started and stopped by the page itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import runnable

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = {
    page: runnable.parse(page) for page in [ROOT / "README.md", *sorted(ROOT.glob("docs/**/*.md"))]
}
MARKED = [page for page, blocks in BLOCKS.items() if runnable.is_marked(blocks)]
RUNNABLE = [page for page in MARKED if runnable.runs(BLOCKS[page])]
# Pages whose examples must stay executed: losing their markers would silently stop the checks.
EXECUTED = {
    "README.md",
    "docs/tutorials/stream.md",
    "docs/tutorials/train-your-own.md",
    "docs/how-to/api-keys.md",
    "docs/how-to/batching.md",
    "docs/how-to/redis.md",
    "docs/how-to/triton-http.md",
    "docs/how-to/mux.md",
}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_tutorials_and_how_tos_are_executed() -> None:
    missing = EXECUTED - {_name(page) for page in RUNNABLE}
    assert not missing, f"pages with nothing to run: {sorted(missing)}"


@pytest.mark.parametrize("page", [pytest.param(page, id=_name(page)) for page in MARKED])
def test_every_code_block_of_a_marked_page_is_marked(page: Path) -> None:
    unmarked = runnable.unmarked(BLOCKS[page])
    assert not unmarked, "mark these run, or skip with a reason: " + ", ".join(
        block.where for block in unmarked
    )


@pytest.mark.parametrize("page", [pytest.param(page, id=_name(page)) for page in RUNNABLE])
def test_page_runs(page: Path, tmp_path: Path) -> None:
    runner = runnable.PageRunner(tmp_path, ROOT)
    try:
        runner.run_page(BLOCKS[page])
    finally:
        runner.close()
