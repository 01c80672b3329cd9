"""Fixtures for the durable-session tests: a real redis-server and real service processes.

``redis-server`` (Debian package ``redis-server``) must be installed: the tests fail, not skip,
without it. Each service instance is ``python -m service`` in a subprocess on a free loopback port,
so a test can restart it, SIGTERM it or SIGKILL it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from loopback import free_port

STARTUP_S = 30.0  # bound on how long a process may take to come up (2 shared cores)


class RedisServer:
    """``redis-server`` on a loopback port, without persistence, in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; these tests need a real Redis "
                "(Debian: apt-get install -y redis-server)",
                pytrace=False,
            )
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


class ServiceProcess:
    """``python -m service`` on a free loopback port with the Redis session store."""

    def __init__(self, models_dir: Path, redis_url: str, log: Path, **settings: Any) -> None:
        self.port = free_port()
        self.log = log
        flags = {
            "host": "127.0.0.1",
            "port": self.port,
            "models-dir": models_dir,
            "providers": "CPUExecutionProvider",
            "session-store": "redis",
            "redis-url": redis_url,
            "log-level": "warning",
            "intra-op-threads": 1,
            **{k.replace("_", "-"): v for k, v in settings.items()},
        }
        self.command = [sys.executable, "-m", "service"]
        for name, value in flags.items():
            self.command += [f"--{name}", str(value)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def wait_ready(self) -> ServiceProcess:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.process.poll() is None, f"the service exited; see {self.log}"
            assert time.monotonic() < deadline, f"the service did not become ready; see {self.log}"
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def terminate(self) -> int:
        """SIGTERM (graceful shutdown) and wait; return the exit status (uvicorn re-raises the
        signal after its graceful shutdown, so a clean exit reads -SIGTERM)."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=20)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.resume()  # a paused server cannot be terminated cleanly
    server.stop()


@pytest.fixture
def start_service(
    models_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """``start_service(**settings)``: a ready service process sharing the test's Redis;
    ``start_service(count=2)`` starts two at once (a start takes seconds on 2 cores)."""
    processes: list[ServiceProcess] = []

    def start(count: int = 1, **settings: Any) -> Any:
        started = []
        for _ in range(count):
            log = tmp_path / f"service-{len(processes)}.log"
            process = ServiceProcess(models_dir, redis_server.url, log, **settings)
            processes.append(process)
            process.launch()
            started.append(process)
        ready = [process.wait_ready() for process in started]
        return ready[0] if count == 1 else ready

    yield start
    for process in processes:
        if process.process is not None and process.process.poll() is None:
            process.kill()
