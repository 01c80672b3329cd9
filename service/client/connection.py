"""A websocket connection to the stream endpoint, with every failure sorted into two kinds.

``ConnectionLost``: reconnecting may help (refused or dropped connections, timeouts, a server
going away or busy). ``ClientError`` (``StreamClosed`` for close codes): final; reconnecting
would fail the same way (an unknown model or session, a wrong key, a frame too big).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from service.client.series import ClientError

# Close codes after which reconnecting can succeed; every other code is final.
RETRYABLE_CLOSE_CODES = frozenset({1000, 1001, 1006, 1011, 1012, 1013, 1014, 4503})
SESSION_NOT_FOUND = 4404  # on a resume: the session expired, was deleted or the server restarted
# HTTP statuses of a refused handshake that are worth retrying.
RETRYABLE_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ConnectionLost(Exception):
    """The connection failed in a way that reconnecting may fix."""


class StreamClosed(ClientError):
    """The server closed the stream with a final close code."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"server closed the stream: {detail}")
        self.code = code


def websocket_url(url: str, path: str, query: dict[str, str] | None = None) -> str:
    """The websocket URL of ``path`` on a server given as ws://HOST:PORT or http://HOST:PORT
    (a URL already ending in ``path`` is kept), with ``query``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ClientError(f"invalid server URL {url!r}; expected ws://HOST:PORT")
    base = parts.path.rstrip("/")
    if not base.endswith(path):
        base += path
    return urlunsplit((scheme, parts.netloc, base, urlencode(query or {}), ""))


async def open_websocket(url: str, headers: dict[str, str], **options: Any) -> ClientConnection:
    """Connect to ``url``; a failure raises ``ConnectionLost`` (retryable) or ``ClientError``.
    ``options`` go to ``websockets``' ``connect`` (``max_size``, ``compression``, ...)."""
    try:
        return await connect(
            url, additional_headers=headers, open_timeout=10, proxy=None, **options
        )
    except InvalidStatus as exc:
        raise refused(exc) from None
    except InvalidURI as exc:
        raise ClientError(f"invalid server URL: {exc}") from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ConnectionLost(_describe(exc)) from None


async def send_message(ws: ClientConnection, data: str | bytes) -> None:
    """Send one message; a closed connection raises as ``to_client_error`` sorts it."""
    try:
        await ws.send(data)
    except ConnectionClosed as exc:
        raise to_client_error(exc) from None


async def receive_message(ws: ClientConnection, timeout: float) -> str | bytes:
    """The next message, within ``timeout`` seconds (else ``ConnectionLost``)."""
    try:
        async with asyncio.timeout(timeout):
            return await ws.recv()
    except ConnectionClosed as exc:
        raise to_client_error(exc) from None
    except TimeoutError:
        raise ConnectionLost(f"no reply within {timeout:g} s") from None


class StreamConnection:
    """One websocket connection, with every failure sorted into retryable or final."""

    def __init__(self, url: str, headers: dict[str, str], reply_timeout: float) -> None:
        self.url = url
        self.headers = headers
        self.reply_timeout = reply_timeout
        self._ws: ClientConnection | None = None

    async def __aenter__(self) -> StreamConnection:
        self._ws = await open_websocket(self.url, self.headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def send(self, frame: dict[str, Any]) -> None:
        assert self._ws is not None
        await send_message(self._ws, json.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        assert self._ws is not None
        message = await receive_message(self._ws, self.reply_timeout)
        try:
            frame = json.loads(message)
        except ValueError:
            raise ClientError(f"server sent a frame that is not JSON: {message[:200]!r}") from None
        if not isinstance(frame, dict):
            raise ClientError(f"server sent an unexpected frame: {frame!r:.200}")
        return frame


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def to_client_error(exc: ConnectionClosed) -> Exception:
    """A closed connection: final for documented fatal codes, otherwise worth a reconnect."""
    if exc.rcvd is None:
        return ConnectionLost("connection dropped")
    code, reason = exc.rcvd.code, exc.rcvd.reason
    detail = f"{reason} (close code {code})" if reason else f"close code {code}"
    if code in RETRYABLE_CLOSE_CODES:
        return ConnectionLost(f"server closed the connection: {detail}")
    return StreamClosed(code, detail)


def refused(exc: InvalidStatus) -> Exception:
    status = exc.response.status_code
    body = _error_text(bytes(exc.response.body or b""))
    detail = f"HTTP {status}" + (f": {body[:200]}" if body else "")
    if status in RETRYABLE_HTTP_STATUSES:
        return ConnectionLost(f"server refused the websocket: {detail}")
    return ClientError(f"server refused the websocket: {detail}")


def _error_text(body: bytes) -> str:
    """The ``error`` field of a JSON error body, or the body itself."""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return str(parsed.get("error", text)) if isinstance(parsed, dict) else text
