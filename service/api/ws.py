"""The websocket API ``/v1/stream``: one session per connection, one reply per frame, in order.

Open with ``?model=NAME[&version=V]`` (a new session) or ``?session_id=ID`` (resume). The first
server frame is ``{"session_id", "model", "version", "step_count"}``. Frames are processed one at a
time, so a flooding client waits on TCP flow control instead of growing server buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.routing import WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.api.frames import (
    Answer,
    authenticate,
    close,
    close_message,
    decode_object,
    serve_frames,
    text_message,
    too_big,
)
from service.api.hot import expected_step_count
from service.api.responses import dumps
from service.engine.dataplane import DataPlane, SessionInfo
from service.engine.errors import BadRequest, InvalidInput, ServiceError

logger = logging.getLogger(__name__)
router = APIRouter()


class _Closed(Exception):
    """The client asked to close the session (``{"close": true}``)."""


class StreamEndpoint:
    """The ASGI app of ``/v1/stream``; see docs/reference/websocket.md for frames and close codes.

    A plain ASGI endpoint rather than a FastAPI route: Starlette's ``WebSocket`` opens the
    connection and says hello, then the frame loop talks to the server's ``receive`` and ``send``
    directly, without the wrapper's state checks on every message (the loop sends nothing after
    a close, and treats an ``OSError`` from ``send`` as the client leaving, as the wrapper does).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        dataplane: DataPlane = websocket.app.state.dataplane
        try:
            owner = authenticate(websocket)
            info, attachment = await _open(dataplane, websocket.query_params, owner)
        except ServiceError as exc:
            await close(websocket, exc.close_code, exc.message)
            return
        try:
            await websocket.send_text(dumps(_hello(info)).decode())
            limit = websocket.app.state.settings.max_request_bytes
            frames = _Frames(dataplane, info.session_id, owner, attachment)
            await serve_frames(receive, send, _answerer(frames, limit))
        except WebSocketDisconnect:
            pass
        finally:
            dataplane.detach(info.session_id, attachment)


STREAM = StreamEndpoint()
router.routes.append(WebSocketRoute("/v1/stream", STREAM, name="stream"))


async def _open(dataplane: DataPlane, params: Any, owner: str | None) -> tuple[SessionInfo, int]:
    model, session_id = params.get("model"), params.get("session_id")
    if (model is None) == (session_id is None):
        raise BadRequest("open /v1/stream with ?model=NAME[&version=V] or ?session_id=ID")
    if session_id is None:
        info = await dataplane.create_session(model, _version(params.get("version")), owner)
        session_id = info.session_id
    return await dataplane.attach(session_id, owner)


def _version(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise BadRequest(f"version must be a positive integer, got {raw!r}")
    return int(raw)


def _hello(info: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "model": info.model,
        "version": info.version,
        "step_count": info.step_count,
    }


@dataclass(frozen=True)
class _Frames:
    """Answers the frames of one streaming connection."""

    dataplane: DataPlane
    session_id: str
    owner: str | None
    attachment: int

    async def answer(self, data: str | bytes) -> dict[str, Any]:
        """The reply to one frame; raises ``_Closed`` after ``{"close": true}``."""
        frame = decode_object(data, '{"inputs": [[1.0]]}')
        if len(frame) != 1 or "inputs" not in frame:  # the common frame skips these checks
            reply = await self._control(frame)
            if reply is not None:
                return reply
        expected = None
        if "expected_step_count" in frame:
            expected = expected_step_count(frame["expected_step_count"])
        step = await self.dataplane.step(
            self.session_id,
            frame["inputs"],
            self.owner,
            self.attachment,
            expected_step_count=expected,
        )
        return {"outputs": step.outputs, "step_count": step.step_count}

    async def _control(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Close or reset the session if the frame asks to; None if it is a step."""
        if frame.get("close") is True:
            await self.dataplane.delete(self.session_id, self.owner)
            raise _Closed
        if frame.get("reset") is True:
            info = await self.dataplane.reset(self.session_id, self.owner)
            return {"reset": True, "step_count": info.step_count}
        if "inputs" not in frame:
            raise InvalidInput('a frame needs "inputs" (or {"close": true} or {"reset": true})')
        return None


def _answerer(frames: _Frames, limit: int) -> Answer:
    """The function answering each received frame: a reply, or a close."""

    async def answer(message: Message) -> Message:
        if (refused := too_big(message, limit)) is not None:
            return refused
        data = message.get("text") or message.get("bytes") or b""
        try:
            reply = await frames.answer(data)
        except _Closed:
            return close_message(1000, "session closed")
        except ServiceError as exc:
            if exc.ends_stream:
                return close_message(exc.close_code, exc.message)
            reply = exc.body()
        return text_message(reply)

    return answer
