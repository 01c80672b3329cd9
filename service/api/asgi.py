"""Raw ASGI plumbing for the per-step endpoints: headers, a bounded body read, answers.

FastAPI's routing, dependency resolution and middleware cost more CPU per request than the model
step itself for the small chunks a stream sends. ``service.api.hot`` serves the per-step
endpoints with these few functions instead; everything else goes through FastAPI.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from starlette.types import Receive, Scope, Send

from service.engine.errors import BodyTooLarge, RequestTimeout, ServiceError

JSON_TYPE = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before its request body arrived: there is nobody to answer."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """The last value of a request header (``name`` lower-case, as ASGI gives header names)."""
    found = None
    for key, value in scope["headers"]:
        if key == name:
            found = value
    return found


def header_text(scope: Scope, name: bytes) -> str | None:
    """``header`` as text (latin-1, as HTTP headers are)."""
    value = header(scope, name)
    return None if value is None else value.decode("latin-1")


async def read_body(receive: Receive, scope: Scope, limit: int, timeout_s: float) -> bytes:
    """The whole request body, at most ``limit`` bytes, within ``timeout_s`` seconds.

    Raises ``BodyTooLarge`` as soon as the declared Content-Length or the bytes received pass the
    limit, ``RequestTimeout`` when the client stops sending before the body is complete (a body
    shorter than its Content-Length would otherwise hold the connection forever), and
    ``ClientGone`` when the client disconnects.
    """
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive_all(receive, limit)
    except TimeoutError:
        raise RequestTimeout(timeout_s) from None


async def _receive_all(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: one message holds the body
        if len(body) > limit:
            raise BodyTooLarge(limit)
        return body
    parts, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


async def send_response(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    """Send a complete response in two ASGI messages; ``headers`` include its content-type."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ServiceError, body: bytes) -> None:
    """Answer ``error`` with its status, its JSON ``body`` and its headers (Retry-After...)."""
    await send_response(send, error.status_code, body, [JSON_TYPE, *encoded_headers(error.headers)])


def encoded_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Response headers as ASGI sends them: lower-case names, bytes."""
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]
