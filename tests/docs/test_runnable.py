"""The docs runner itself: markers, output matching and the rewriting for the test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import runnable


@pytest.mark.parametrize(
    ("expected", "actual", "match"),
    [
        pytest.param('{"a": 1.5}', '{"a":1.500001}', True, id="numbers-within-tolerance"),
        pytest.param('{"a": 1.5}', '{"a":1.6}', False, id="numbers-apart"),
        pytest.param('{"id":"...","n":3}', '{"id":"x-Y_z","n":3}', True, id="wildcard"),
        pytest.param("a\n...\nz 9", "a\nb 1\nc 2\nz 9", True, id="wildcard-lines"),
        pytest.param("1 ... 5\n2 ... 6", "1 4 5\n2 9 6", True, id="numbers-after-wildcards"),
        pytest.param("ok", "ok\nmore", False, id="whole-output"),
        pytest.param("a  b\n", "a b", True, id="white-space"),
    ],
)
def test_output_matches(expected: str, actual: str, match: bool) -> None:
    assert runnable.output_matches(expected, actual) is match


def test_blocks_carry_the_marker_above_them(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: run exit=1 -->\n```bash\nfalse\n```\n\n```python\nprint(1)\n```\n"
        "<!-- docs-test: skip needs a GPU -->\n```bash\nnvidia-smi\n```\n"
    )
    blocks = runnable.parse(page)
    assert [(b.kind, b.language, b.code) for b in blocks] == [
        ("run", "bash", "false\n"),
        (None, "python", "print(1)\n"),
        ("skip", "bash", "nvidia-smi\n"),
    ]
    assert blocks[0].options["exit"] == "1" and blocks[2].options["reason"] == "needs a GPU"
    assert runnable.unmarked(blocks) == [blocks[1]]


def test_documented_addresses_and_commands_are_rewritten(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in runnable.COPIED:
        (repo / name).mkdir(parents=True)
    runner = runnable.PageRunner(tmp_path / "work", repo, python="/opt/py/bin/python")
    code = runner.rewrite(
        "curl localhost:8000/x; redis-server --port 6379; .venv/bin/python -m service; make serve"
    )
    web, redis = runner.ports[8000], runner.ports[6379]
    assert f"localhost:{web}/x" in code and f"--port {redis}" in code
    assert "/opt/py/bin/python -m service" in code
    installed = "-o /opt/py/bin/.serve-cpu -o /opt/py/bin/.serve-gpu"
    assert f"{installed} serve BIN=/opt/py/bin PORT={web}" in code


def test_bash_blocks_share_variables(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    for name in runnable.COPIED:
        (tmp_path / "repo" / name).mkdir()
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: run -->\n```bash\nSID=abc\n```\n"
        "<!-- docs-test: run -->\n```bash\necho $SID\n```\n<!-- docs-test: output -->\n"
        "```text\nabc\n```\n"
    )
    runnable.PageRunner(tmp_path / "work", tmp_path / "repo", sys.executable).run_page(
        runnable.parse(page)
    )
