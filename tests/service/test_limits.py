"""Request limits against a live server, byte by byte: bodies that stall or run over."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from loopback import HOST

STALL_S = 0.5


def _raw_request(port: int, head: bytes, body: bytes, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """Send ``head`` and ``body`` on a new connection; return the answer and whether the server
    closed the connection after it (within ``wait_s`` seconds)."""
    with socket.create_connection((HOST, port), timeout=wait_s) as sock:
        sock.sendall(head + body)
        received = b""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            if not chunk:
                return received, True
            received += chunk
        return received, False


def _session(server: Any) -> str:
    response = httpx.post(f"{server.http_url}/v1/sessions", json={"model": "tiny"}, timeout=5)
    session_id: str = response.json()["session_id"]
    return session_id


@pytest.mark.parametrize("fast_paths", [True, False], ids=["raw-handler", "fastapi-route"])
def test_a_body_shorter_than_its_content_length_times_out_and_closes(
    make_server: Callable[..., Any], fast_paths: bool
) -> None:
    server = make_server(body_timeout_s=STALL_S, fast_paths=fast_paths)
    sid = _session(server)
    head = (
        f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nHost: {HOST}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer, closed = _raw_request(server.port, head, b'{"inputs": [[1, 2]]')
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.5 s" in answer
    assert closed and time.monotonic() - started < 4
    info = httpx.get(f"{server.http_url}/v1/sessions/{sid}", timeout=5).json()
    assert info["step_count"] == 0  # nothing applied


def test_a_stalled_body_on_any_route_times_out(make_server: Callable[..., Any]) -> None:
    server = make_server(body_timeout_s=STALL_S)
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: {HOST}\r\n"
        "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    ).encode()
    answer, closed = _raw_request(server.port, head, b'{"model": ')
    assert answer.startswith(b"HTTP/1.1 408") and closed, answer[:200]


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(
    make_server: Callable[..., Any],
) -> None:
    server = make_server()
    sid = _session(server)
    head = (
        f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nHost: {HOST}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    answer, _ = _raw_request(server.port, head, b"")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than the limit of 65536 bytes" in answer
