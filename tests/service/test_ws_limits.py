"""Websocket abuse against a real server process: ping floods, deep nesting."""

from __future__ import annotations

import json
import os
import socket
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import HOST
from processes import resident_bytes, service_process
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[2]
FLOOD_BYTES = 96 << 20  # what an unbounded server would buffer
GROWTH_LIMIT = 16 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(ROOT / "models" / "co2-forecaster", models / "co2-forecaster")
    with service_process(models, api_keys="good-key") as (url, process):
        yield url, process.pid


def _handshake(port: int, path: str) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    key = b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _pings(count: int) -> bytes:
    """``count`` masked ping frames of 125 bytes each (a client must mask)."""
    mask, payload = b"\x01\x02\x03\x04", b"p" * 125
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return (bytes([0x89, 0x80 | 125]) + mask + masked) * count


def _flood(sock: socket.socket, seconds: float) -> int:
    """Send pings without reading anything back; return how many bytes the server took."""
    chunk, sent = _pings(1000), 0
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while sent < FLOOD_BYTES and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except TimeoutError:  # the server stopped reading: TCP holds the client back
            continue
    return sent


@pytest.mark.parametrize("path", ["/v1/stream?model=co2-forecaster&token=good-key", "/v1/stream"])
def test_a_ping_flood_cannot_grow_the_servers_memory(server: tuple[str, int], path: str) -> None:
    """An attached client, and one refused with 4401 (no key), flood pings and read nothing."""
    url, pid = server
    before = resident_bytes(pid)
    sock = _handshake(int(url.rsplit(":", 1)[1]), path)
    try:
        sent = _flood(sock, seconds=8)
        time.sleep(0.5)
        grown = resident_bytes(pid) - before
    finally:
        sock.close()
    assert sent < FLOOD_BYTES  # the server stopped taking pings it could not answer
    assert grown < GROWTH_LIMIT, f"the server grew by {grown / 1e6:.0f} MB"


@pytest.mark.parametrize("depth", [1000, 3000])
async def test_a_deeply_nested_frame_gets_an_error_frame(
    server: tuple[str, int], depth: int
) -> None:
    url, _ = server
    ws_url = url.replace("http", "ws") + "/v1/stream?model=co2-forecaster&token=good-key"
    async with connect(ws_url) as ws:
        json.loads(await ws.recv())
        await ws.send('{"inputs": ' + "[" * depth + "]" * depth + "}")
        reply = json.loads(await ws.recv())
        assert "error" in reply, reply
        await ws.send(json.dumps({"inputs": [[0.5]]}))  # the connection goes on
        assert json.loads(await ws.recv())["step_count"] == 1
