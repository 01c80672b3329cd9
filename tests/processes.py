"""Real service processes for the tests: ``python -m service`` on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from loopback import HOST, free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def running_server(models_dir: Path, **settings: str) -> Iterator[str]:
    """A real service process with ``RNNSERVE_*`` settings; yields its base URL (http://...)."""
    with service_process(models_dir, **settings) as (url, _):
        yield url


@contextmanager
def service_process(
    models_dir: Path, **settings: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``running_server``, yielding the process too (its pid, for /proc)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port)]
    env = os.environ | {
        "RNNSERVE_MODELS_DIR": str(models_dir),
        "RNNSERVE_PROVIDERS": "CPUExecutionProvider",
        "RNNSERVE_LOG_LEVEL": "warning",
    }
    env |= {f"RNNSERVE_{name.upper()}": value for name, value in settings.items()}
    log = models_dir.parent / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=sink)
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(process, url, log)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=15)


def resident_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited during startup:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server was not ready within 60 s")
