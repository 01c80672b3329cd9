"""The websocket API ``/v1/stream``: one session per connection, one reply per frame, in order.

Open with ``?model=NAME[&version=V]`` (a new session) or ``?session_id=ID`` (resume). The first
server frame is ``{"session_id", "model", "version", "step_count"}``. Frames are processed one at a
time, so a flooding client waits on TCP flow control instead of growing server buffers.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from service.api.auth import identify
from service.api.responses import dumps
from service.dataplane import DataPlane, SessionInfo
from service.errors import BadRequest, InvalidInput, ServiceError

logger = logging.getLogger(__name__)
router = APIRouter()

FATAL_STATUSES = {401, 404, 409}  # the connection or its session is gone: close
REASON_BYTES = 123  # the most a close reason may hold


class _Closed(Exception):
    """The client asked to close the session (``{"close": true}``)."""


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Stream chunks through one session; see docs/service.md for frames and close codes."""
    await websocket.accept()
    dataplane: DataPlane = websocket.app.state.dataplane
    try:
        owner = _authenticate(websocket)
        info, attachment = await _open(dataplane, websocket.query_params, owner)
    except ServiceError as exc:
        await _close(websocket, exc.close_code, exc.message)
        return
    try:
        await websocket.send_text(dumps(_hello(info)).decode())
        await _serve(websocket, dataplane, info.session_id, owner, attachment)
    except WebSocketDisconnect:
        pass
    finally:
        dataplane.detach(info.session_id, attachment)


def _authenticate(websocket: WebSocket) -> str | None:
    settings = websocket.app.state.settings
    headers, params = websocket.headers, websocket.query_params
    return identify(settings.api_keys, headers.get("authorization"), params.get("token"))


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


async def _serve(
    websocket: WebSocket, dataplane: DataPlane, session_id: str, owner: str | None, attachment: int
) -> None:
    limit = websocket.app.state.settings.max_request_bytes
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text") or message.get("bytes") or b""
        if len(data) > limit:  # uvicorn enforces this too (ws_max_size); the test client not
            await _close(websocket, 1009, f"message larger than {limit} bytes")
            return
        try:
            reply = await _handle(dataplane, data, session_id, owner, attachment)
        except _Closed:
            await _close(websocket, 1000, "session closed")
            return
        except ServiceError as exc:
            if exc.status_code in FATAL_STATUSES:
                await _close(websocket, exc.close_code, exc.message)
                return
            reply = {"error": exc.message}
        await websocket.send_text(dumps(reply).decode())


async def _handle(
    dataplane: DataPlane, data: str | bytes, session_id: str, owner: str | None, attachment: int
) -> dict[str, Any]:
    frame = _decode(data)
    if frame.get("close") is True:
        await dataplane.delete(session_id, owner)
        raise _Closed
    if frame.get("reset") is True:
        info = await dataplane.reset(session_id, owner)
        return {"reset": True, "step_count": info.step_count}
    if "inputs" not in frame:
        raise InvalidInput('a frame needs "inputs" (or {"close": true} or {"reset": true})')
    result = await dataplane.step(session_id, frame["inputs"], owner, attachment)
    return {"outputs": result.outputs, "step_count": result.step_count}


def _decode(data: str | bytes) -> dict[str, Any]:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON frame: {exc}") from None
    if not isinstance(frame, dict):
        raise InvalidInput('a frame must be a JSON object such as {"inputs": [[1.0]]}')
    return frame


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state is WebSocketState.CONNECTED:
        encoded = reason.encode()[:REASON_BYTES].decode(errors="ignore")
        await websocket.close(code=code, reason=encoded)
