"""The compose topology without Docker: three replicas, a real nginx running the repository's
deploy/nginx.conf (rendered for local upstreams) and a real Redis, on loopback.

Clients stream through nginx over /v1 (with expected_step_count), a websocket (resuming after a
drop) and V2 sequences, while one replica is killed mid-stream. Every step a client saw
acknowledged must be in the final state, and none may be applied twice: the test counts both.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from loopback import HOST, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.engine.store import codec

if TYPE_CHECKING:
    from conftest import RedisServer, ServiceProcess, TinyGRU

ROOT = Path(__file__).resolve().parents[3]
REPLICAS = 3
STEPS = 24  # per stream
RETRIES = 40


def render(conf: str, ports: list[int], listen: int) -> str:
    """deploy/nginx.conf with local upstreams: the replicas' ports instead of Docker's DNS."""
    upstream = "server rnnserve:8000 resolve max_fails=1 fail_timeout=5s;"
    assert conf.count(upstream) == 2 and "listen 80;" in conf
    local = "\n    ".join(f"server {HOST}:{p} max_fails=1 fail_timeout=5s;" for p in ports)
    conf = conf.replace(upstream, local).replace("listen 80;", f"listen {HOST}:{listen};")
    conf = "\n".join(line for line in conf.splitlines() if not line.startswith("resolver "))
    # Test-only: name the replica that answered, so the test can kill the one serving a stream.
    marker = "    location /v1/stream {"
    named = "    add_header X-Upstream $upstream_addr always;\n\n" + marker
    return conf.replace(marker, named, 1)


@dataclass
class Nginx:
    port: int
    process: subprocess.Popen[bytes]
    folder: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@pytest.fixture
def replicas(start_service: Callable[..., ServiceProcess]) -> list[ServiceProcess]:
    started: list[ServiceProcess] = start_service(count=REPLICAS, idle_ttl_s=600)
    return started


@pytest.fixture
def nginx(replicas: list[ServiceProcess], tmp_path: Path) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.fail("nginx is not installed (Debian: apt-get install -y nginx)", pytrace=False)
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    site = render((ROOT / "deploy" / "nginx.conf").read_text(), [r.port for r in replicas], port)
    (folder / "site.conf").write_text(site)
    user = "user root;" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(
        f"{user}\ndaemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {folder}/body;\n"
        f"  proxy_temp_path {folder}/proxy;\n  include {folder}/site.conf;\n}}\n"
    )
    process = subprocess.Popen(
        [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    proxy = Nginx(port, process, folder)
    deadline = time.monotonic() + 10
    while True:
        assert process.poll() is None, (folder / "error.log").read_text()
        try:
            if httpx.get(proxy.url + "/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "nginx did not come up"
        time.sleep(0.05)
    yield proxy
    process.send_signal(signal.SIGQUIT)
    process.wait(timeout=10)


@dataclass
class Stream:
    """What a client knows of one stream: its inputs, and the steps acknowledged to it."""

    name: str
    inputs: np.ndarray  # (STEPS, 2)
    session_id: str = ""
    acked: int = 0  # steps the client saw acknowledged (answered, or reported applied)
    retries: int = 0
    outputs: dict[int, list[float]] = field(default_factory=dict)


def _upstream_port(response: httpx.Response) -> int:
    """The port of the replica that answered (the last one nginx tried)."""
    return int(response.headers["x-upstream"].split(",")[-1].rsplit(":", 1)[1])


def step_v1(proxy: Nginx, stream: Stream, kill: Callable[[], None]) -> None:
    """Step a /v1 session through nginx, one step per request, retrying what failed."""
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        while stream.acked < STEPS:
            if stream.acked == STEPS // 2:
                kill()
            row = stream.inputs[stream.acked].tolist()
            body = {"inputs": [row], "expected_step_count": stream.acked}
            try:
                answer = http.post(f"/v1/sessions/{stream.session_id}/steps", json=body)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 200:
                stream.outputs[stream.acked] = answer.json()["outputs"][0]
                stream.acked += 1
            elif answer is not None and answer.status_code == 409:
                stream.acked = answer.json()["step_count"]  # applied, its answer was lost
            else:
                stream.retries += 1
                assert stream.retries < RETRIES, answer.text if answer is not None else "?"
                time.sleep(0.1)


async def step_websocket(proxy: Nginx, stream: Stream, kill: Callable[[], None]) -> None:
    """Stream over a websocket through nginx; after a drop, resume with ?session_id."""
    base = proxy.url.replace("http", "ws") + "/v1/stream"
    while stream.acked < STEPS:
        query = f"session_id={stream.session_id}" if stream.session_id else "model=tiny"
        url = f"{base}?{query}"
        try:
            async with connect(url, open_timeout=5) as ws:
                hello = json.loads(await ws.recv())
                stream.session_id, stream.acked = hello["session_id"], hello["step_count"]
                while stream.acked < STEPS:
                    if stream.acked == STEPS // 2:
                        kill()
                    row = stream.inputs[stream.acked].tolist()
                    frame = {"inputs": [row], "expected_step_count": stream.acked}
                    await ws.send(json.dumps(frame))
                    reply = json.loads(await ws.recv())
                    assert "error" not in reply, reply
                    stream.outputs[stream.acked] = reply["outputs"][0]
                    stream.acked += 1
        except (ConnectionClosed, InvalidStatus, OSError, TimeoutError):
            stream.retries += 1
            assert stream.retries < RETRIES
            await asyncio.sleep(0.1)


def step_v2(proxy: Nginx, stream: Stream, sequence_id: int, kill: Callable[[], None]) -> None:
    """A V2 sequence through nginx (any replica may answer each request)."""
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        while stream.acked < STEPS:
            if stream.acked == STEPS // 2:
                kill()
            parameters = {
                "sequence_id": sequence_id,
                "sequence_start": stream.acked == 0 and not stream.session_id,
                "expected_step_count": stream.acked,
            }
            x = {"name": "x", "shape": [1, 1, 2], "datatype": "FP32",
                 "data": stream.inputs[stream.acked].tolist()}  # fmt: skip
            body = {"parameters": parameters, "inputs": [x], "outputs": [{"name": "y"}]}
            try:
                answer = http.post("/v2/models/tiny/infer", json=body)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 200:
                reply = answer.json()
                stream.session_id = reply["parameters"]["session_id"]
                stream.outputs[stream.acked] = reply["outputs"][0]["data"]
                stream.acked += 1
            elif answer is not None and answer.status_code == 409:
                stream.acked = answer.json()["step_count"]
            else:
                stream.retries += 1
                assert stream.retries < RETRIES, answer.text if answer is not None else "?"
                time.sleep(0.1)


def test_no_acknowledged_step_is_lost_or_applied_twice_when_a_replica_dies(
    nginx: Nginx, replicas: list[ServiceProcess], redis_server: RedisServer, tiny: TinyGRU
) -> None:
    rng = np.random.default_rng(8)
    streams = [Stream(f"s{i}", rng.normal(size=(STEPS, 2)).astype(np.float32)) for i in range(7)]
    v1, ws, v2 = streams[:4], streams[4], streams[5:]
    with httpx.Client(base_url=nginx.url, timeout=10) as http:
        for stream in v1:
            created = http.post("/v1/sessions", json={"model": "tiny"})
            stream.session_id = created.json()["session_id"]
        first = http.post(f"/v1/sessions/{v1[0].session_id}/steps", json={"inputs": [[0, 0]]})
        assert first.status_code == 200
    v1[0].inputs = np.concatenate([[[0, 0]], v1[0].inputs[:-1]]).astype(np.float32)
    v1[0].acked, v1[0].outputs[0] = 1, first.json()["outputs"][0]
    # The replica that serves the first stream's steps is the one that dies, mid-stream.
    victim = next(r for r in replicas if r.port == _upstream_port(first))
    killed = threading.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            victim.kill()

    workers = [threading.Thread(target=step_v1, args=(nginx, s, kill)) for s in v1]
    for i, stream in enumerate(v2):
        workers.append(threading.Thread(target=step_v2, args=(nginx, stream, 90 + i, kill)))
    workers.append(threading.Thread(target=lambda: asyncio.run(step_websocket(nginx, ws, kill))))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert killed.is_set() and victim.process is not None and victim.process.poll() is not None

    lost = twice = 0
    for stream in streams:
        assert stream.acked == STEPS, (stream.name, stream.acked)
        blob = redis_server.client().hget(f"rnnserve:session:{stream.session_id}", "blob")
        if blob is None:  # a V2 sequence is deleted at its end; these never sent one
            raise AssertionError(f"{stream.name}: session gone from Redis")
        record = codec.decode(blob)
        lost += max(0, stream.acked - record.step_count)
        twice += max(0, record.step_count - stream.acked)
        _, state = tiny.run(stream.inputs)  # exactly once each, in order
        np.testing.assert_allclose(record.state[0], state, atol=1e-5)
        reference = tiny.run(stream.inputs)[0]
        for index, output in stream.outputs.items():
            np.testing.assert_allclose(output, reference[index], atol=1e-5)
    assert (lost, twice) == (0, 0)
    assert any(stream.retries for stream in streams)  # the kill did hit some streams
