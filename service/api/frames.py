"""What the websocket endpoints (``/v1/stream``, ``/v1/mux``) share: keys, the frame loop, closes.

Both accept with Starlette's ``WebSocket``, then answer frames by talking to the server's
``receive`` and ``send`` directly: one frame at a time, so a flooding client waits on TCP flow
control instead of growing server buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive, Send
from starlette.websockets import WebSocket, WebSocketState

from service.api.auth import identify
from service.api.responses import dumps, loads
from service.engine.errors import BadRequest, InvalidInput, internal_error

logger = logging.getLogger(__name__)

REASON_BYTES = 123  # the most a close reason may hold
Answer = Callable[[Message], Awaitable[Message]]


def authenticate(websocket: WebSocket) -> str | None:
    """The caller's key from ``Authorization: Bearer`` or ``?token=`` (browsers cannot send
    headers on a websocket); None when the service has no keys."""
    settings = websocket.app.state.settings
    headers, params = websocket.headers, websocket.query_params
    return identify(settings.api_keys, headers.get("authorization"), params.get("token"))


async def serve_frames(receive: Receive, send: Send, answer: Answer) -> None:
    """Answer frames until the client leaves or an answer closes the connection.

    An answer that raises unexpectedly closes the connection with 1011 and the reason, rather
    than dropping it without a close frame.
    """
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            reply = await answer(message)
        except Exception as exc:
            logger.exception("unhandled error answering a websocket frame")
            reply = close_message(1011, internal_error(exc))
        try:
            await send(reply)
        except OSError:  # the client left meanwhile (Starlette's WebSocket says 1006)
            return
        if reply["type"] == "websocket.close":
            return


def decode_object(data: str | bytes, example: str) -> dict[str, Any]:
    """A JSON frame that must be an object (``example`` shows one in the error message)."""
    try:
        frame = loads(data)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON frame: {exc}") from None
    if not isinstance(frame, dict):
        raise InvalidInput(f"a frame must be a JSON object such as {example}")
    return frame


def text_message(content: Any) -> Message:
    return {"type": "websocket.send", "text": dumps(content).decode()}


def too_big(message: Message, limit: int) -> Message | None:
    """The close answering a message over ``limit`` bytes (uvicorn's ws_max_size enforces it
    too, but the test client does not), or None."""
    data = message.get("text") or message.get("bytes") or b""
    if len(data) > limit:
        return close_message(1009, f"message larger than {limit} bytes")
    return None


async def close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state is WebSocketState.CONNECTED:
        await websocket.send(close_message(code, reason))


def close_message(code: int, reason: str) -> Message:
    """A close message; its reason cut to what a close frame holds, on a character boundary."""
    encoded = reason.encode()[:REASON_BYTES].decode(errors="ignore")
    return {"type": "websocket.close", "code": code, "reason": encoded}
