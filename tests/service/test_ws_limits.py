"""The websocket protocol against a real server process, byte by byte: ping floods, deep
nesting, and frames the fast path leaves to the general one (fragments, several frames in one
read, invalid UTF-8, long frames)."""

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


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    first, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return first & 0x0F, exactly(length)


def _stream(server: tuple[str, int]) -> socket.socket:
    sock = _handshake(int(server[0].rsplit(":", 1)[1]), _PATH)
    opcode, hello = _read_frame(sock)
    assert opcode == 1 and json.loads(hello)["step_count"] == 0
    return sock


_PATH = "/v1/stream?model=co2-forecaster&token=good-key"


def _step(value: float, count: int) -> bytes:
    return json.dumps({"inputs": [[value]], "expected_step_count": count}).encode()


def test_frames_left_to_the_general_path_are_answered_alike(server: tuple[str, int]) -> None:
    sock = _stream(server)
    try:
        body = _step(0.5, 0)
        sock.sendall(_frame(1, body[:7], fin=False) + _frame(0, body[7:]))  # fragmented
        assert json.loads(_read_frame(sock)[1])["step_count"] == 1
        sock.sendall(_frame(1, _step(0.5, 1)) + _frame(1, _step(0.5, 2)))  # two in one read
        assert [json.loads(_read_frame(sock)[1])["step_count"] for _ in range(2)] == [2, 3]
        padded = _step(0.5, 3).replace(b"{", b"{" + b" " * 300, 1)  # the 126-byte length form
        sock.sendall(_frame(1, padded))
        assert json.loads(_read_frame(sock)[1])["step_count"] == 4
        sock.sendall(_frame(2, _step(0.5, 4)))  # JSON in a binary frame
        opcode, reply = _read_frame(sock)
        assert opcode == 1 and json.loads(reply)["step_count"] == 5
        sock.sendall(_frame(1, b'{"inputs": "\xff\xfe"}'))  # not UTF-8
        opcode, reason = _read_frame(sock)
        assert opcode == 8 and int.from_bytes(reason[:2], "big") == 1007
    finally:
        sock.close()
