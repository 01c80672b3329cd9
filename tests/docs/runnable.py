"""Run the documentation: the marked code blocks of a page, in order, against real servers.

A fenced block is marked by an HTML comment on the line just above its fence (invisible on the
site and on GitHub):

- ``<!-- docs-test: run [exit=N] [timeout=S] -->``: run the bash or python block; it must exit
  with N (default 0) within S seconds (default 60).
- ``<!-- docs-test: background [wait=PORT] [ready=http|tcp] -->``: start the bash block and leave
  it running until the page ends (a server); wait until PORT (default 8000) answers
  ``/health/ready`` (``ready=tcp``: accepts a connection). A block waiting on a port that an
  earlier one serves replaces it (a restart).
- ``<!-- docs-test: output -->``: what the block before printed. ``...`` stands for any text, runs
  of white space match any white space (or none), and numbers match within a relative 1e-4.
- ``<!-- docs-test: skip REASON -->``: shown, not run (say why).

On a page with markers every bash, sh, console and python block needs one, so an example cannot
quietly go unchecked. Blocks run in a scratch folder holding copies of ``models/`` and
``examples/``; bash blocks of a page share one set of variables (``SID=...`` in one block is seen
by the next), and each python block is a script of its own. Pages are written for a reader: they
use ``localhost:8000`` (and 8001, 6379, ...), ``.venv/bin/python`` and ``make serve``; the runner
maps every such port to a free loopback port, and those commands to this interpreter and to the
Makefile's own recipe.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loopback import HOST, free_port

MARKER = re.compile(r"^\s*<!-- docs-test: (run|background|output|skip)\b(.*?)-->\s*$")
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")
CHECKED_LANGUAGES = {"bash", "sh", "console", "python"}
PORT_AFTER_HOST = re.compile(r"(?<=localhost:|127\.0\.0\.1:)(\d{4,5})\b")
PORT_FLAG = re.compile(r"(?<=--port[ =])(\d{4,5})\b")
VENV_PYTHON = re.compile(r"(?<![\w/.])\.venv/bin/python3?\b")
MAKE_SERVE = re.compile(r"\bmake serve\b")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w)")
TOKEN = re.compile(rf"\.\.\.|{NUMBER.pattern}|\w+|\S")
COPIED = ("models", "examples")
DEFAULT_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RELATIVE_TOLERANCE = 1e-4
ABSOLUTE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page, with its marker if it has one."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    kind: str | None = None  # run, background, output, skip; None: unmarked
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, in order, each with the marker just above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, language = fence.groups()
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(ticks)), len(lines)
        )
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        kind, options = (marker.group(1), _options(marker.group(2))) if marker else (None, {})
        blocks.append(Block(path, i + 1, language, "\n".join(body) + "\n", kind, options))
        i = end + 1
    return blocks


def _options(text: str) -> dict[str, str]:
    words = text.split()
    return dict(word.split("=", 1) for word in words if "=" in word) | {
        "reason": " ".join(word for word in words if "=" not in word)
    }


def is_marked(blocks: list[Block]) -> bool:
    """Whether a page takes part: any of its blocks has a marker."""
    return any(block.kind is not None for block in blocks)


def runs(blocks: list[Block]) -> bool:
    """Whether a page has anything to run."""
    return any(block.kind in ("run", "background") for block in blocks)


def unmarked(blocks: list[Block]) -> list[Block]:
    """Blocks of a checked language with no marker: each must be run, or skipped with a reason."""
    return [b for b in blocks if b.language in CHECKED_LANGUAGES and b.kind is None]


def output_matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` is ``expected`` up to ``...``, white space and number precision.

    Both are split into tokens (numbers, words, single other characters; white space only
    separates); ``...`` matches any run of tokens, numbers match within the tolerances, and the
    rest must be equal. Every way of aligning the wildcards is tried, as in glob matching.
    """
    want, have = TOKEN.findall(expected), TOKEN.findall(actual)
    reach = [True] + [False] * len(have)  # reach[j]: the tokens so far match have[:j]
    for token in want:
        if token == "...":
            reach = list(itertools.accumulate(reach, operator.or_))
        else:
            reach = [False] + [reach[j] and _same(token, have[j]) for j in range(len(have))]
    return reach[-1]


def _same(want: str, have: str) -> bool:
    if NUMBER.fullmatch(want) and NUMBER.fullmatch(have):
        return math.isclose(
            float(want), float(have), rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_TOLERANCE
        )
    return want == have


@dataclass
class Ran:
    block: Block
    command: str
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"{self.block.where} exited {self.returncode}\n--- ran:\n{self.command}"
            f"\n--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"
        )


class PageRunner:
    """Runs one page's blocks in a scratch folder; ``close`` stops what the page started."""

    def __init__(self, workdir: Path, repo: Path, python: str = sys.executable) -> None:
        self.workdir = workdir
        self.repo = repo
        self.python = python
        self.ports: dict[int, int] = {}  # documented port -> free loopback port
        self.background: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
        self.state = workdir / ".docs-test-bash-state"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
        for name in COPIED:
            shutil.copytree(repo / name, workdir / name)

    # ---------------------------------------------------------------- rewriting for the test
    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = free_port()
        return self.ports[documented]

    def rewrite(self, code: str) -> str:
        code = PORT_AFTER_HOST.sub(lambda m: str(self.port(int(m.group(1)))), code)
        code = PORT_FLAG.sub(lambda m: str(self.port(int(m.group(1)))), code)
        code = VENV_PYTHON.sub(shlex.quote(self.python), code)
        bin_dir = shlex.quote(str(Path(self.python).parent))
        installed = " ".join(f"-o {bin_dir}/.serve-{kind}" for kind in ("cpu", "gpu"))
        serve = (
            f"make -f {shlex.quote(str(self.repo / 'Makefile'))} {installed} serve "
            f"BIN={bin_dir} PORT={self.port(8000)}"
        )
        return MAKE_SERVE.sub(serve, code)

    # ---------------------------------------------------------------- running
    def run_page(self, blocks: list[Block]) -> None:
        """Run every marked block in order; AssertionError names the first that fails."""
        previous: Ran | None = None
        for block in blocks:
            if block.kind == "run":
                previous = self.run(block)
                expected = int(block.options.get("exit", "0"))
                assert previous.returncode == expected, previous.describe()
            elif block.kind == "background":
                self.start(block)
            elif block.kind == "output":
                assert previous is not None, f"{block.where}: output without a block run before it"
                assert output_matches(block.code, previous.stdout), (
                    f"{block.where}: the output differs from the page's\n--- page:\n{block.code}"
                    f"\n--- actual:\n{previous.stdout}\n--- stderr:\n{previous.stderr}"
                )

    def run(self, block: Block) -> Ran:
        timeout = float(block.options.get("timeout", DEFAULT_TIMEOUT_S))
        code = self.rewrite(block.code)
        if block.language == "python":
            script = self.workdir / f"block_{block.line}.py"
            script.write_text(code, encoding="utf-8")
            argv = [self.python, str(script)]
        else:
            argv = ["bash", "-c", self._bash(code)]
        try:
            done = subprocess.run(
                argv, cwd=self.workdir, env=self.env, capture_output=True, text=True,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{block.where} did not finish within {timeout:g} s") from exc
        return Ran(block, code, done.returncode, done.stdout, done.stderr)

    def _bash(self, code: str) -> str:
        state = shlex.quote(str(self.state))
        return (
            f"set -euo pipefail\nset -a\nif [ -f {state} ]; then source {state}; fi\n"
            f"{code}\nexport -p > {state}\n"
        )

    def start(self, block: Block) -> None:
        documented = int(block.options.get("wait", "8000"))
        port = self.port(documented)
        self.stop(documented)
        log = self.workdir / f"background_{block.line}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", self._bash(self.rewrite(block.code))], cwd=self.workdir,
                env=self.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.background[documented] = (process, log)
        check = _tcp_ready if block.options.get("ready", "http") == "tcp" else _http_ready
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not check(port):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(documented)
                raise AssertionError(
                    f"{block.where}: nothing ready on port {documented} (here {port})\n"
                    f"--- log:\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.1)

    def stop(self, documented: int) -> None:
        """Stop a background block and everything it started; wait until its port is free."""
        entry = self.background.pop(documented, None)
        if entry is None:
            return
        process, _ = entry
        port = self.port(documented)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            # The shell exits at once; the server it started may still be listening.
            while process.poll() is None or _tcp_ready(port):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return

    def close(self) -> None:
        for documented in reversed(list(self.background)):  # servers before what they use
            self.stop(documented)


def _http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tcp_ready(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False
