"""The websocket endpoint ``/v1/mux``: the steps of many sessions per frame.

A thin layer over ``service.engine.groups.StreamGroup``: it decodes frames (``codec`` for binary
steps, JSON for control messages and for steps from clients that cannot build binary), calls the
group and encodes its answers. docs/reference/mux.md specifies every message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from starlette.routing import WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.api.frames import (
    authenticate,
    close,
    decode_object,
    serve_frames,
    text_message,
    too_big,
)
from service.engine.dataplane import DataPlane
from service.engine.errors import BadRequest, NotReady, ServiceError
from service.engine.groups import FrameResult, Opened, StreamGroup
from service.mux import codec

logger = logging.getLogger(__name__)

PROTOCOL = "rnnserve-mux/1"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ControlOp = Callable[["_Mux", dict[str, Any]], Awaitable[dict[str, Any]]]


class MuxEndpoint:
    """The ASGI app of ``/v1/mux``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        await websocket.accept()
        dataplane: DataPlane = websocket.app.state.dataplane
        settings = websocket.app.state.settings
        try:
            owner = authenticate(websocket)
            if not dataplane.ready:
                raise NotReady()
        except ServiceError as exc:
            await close(websocket, exc.close_code, exc.message)
            return
        group = StreamGroup(dataplane, owner)
        mux = _Mux(group, settings.mux_max_entries, settings.max_steps_per_chunk)
        try:
            await send(text_message(_hello(mux.max_entries, mux.max_steps)))
            limit = settings.max_request_bytes
            await serve_frames(receive, send, lambda m: mux.answer(m, limit))
        except WebSocketDisconnect:
            pass
        finally:
            group.release_all()


MUX = MuxEndpoint()


def route() -> WebSocketRoute:
    return WebSocketRoute("/v1/mux", MUX, name="mux")


def _hello(max_entries: int, max_steps: int) -> dict[str, Any]:
    return {
        "op": "hello",
        "protocol": PROTOCOL,
        "max_entries": max_entries,
        "max_steps": max_steps,
    }


class _Mux:
    """Answers the frames of one mux connection."""

    def __init__(self, group: StreamGroup, max_entries: int, max_steps: int) -> None:
        self.group = group
        self.max_entries = max_entries
        self.max_steps = max_steps

    async def answer(self, message: Message, limit: int) -> Message:
        if (refused := too_big(message, limit)) is not None:
            return refused
        data = message.get("bytes")
        if data is not None:
            return await self._binary_step(data)
        request_id = None
        try:
            frame = decode_object(message.get("text") or "", '{"op": "open", "model": "m"}')
            request_id = frame.get("request_id")
            reply = await self._control(frame)
        except ServiceError as exc:
            reply = {"op": "error", **exc.body()}
        if request_id is not None:
            reply["request_id"] = request_id
        return text_message(reply)

    async def _binary_step(self, data: bytes) -> Message:
        try:
            frame = codec.decode_step(data, self.max_entries, self.max_steps)
        except codec.FrameError as exc:
            return text_message({"op": "error", "request_id": exc.request_id, "error": str(exc)})
        result = await self.group.step(frame.handles, frame.inputs, frame.expected)
        reply = codec.StepReply(
            result.status, result.step_counts, result.outputs, result.messages, frame.request_id
        )
        return {"type": "websocket.send", "bytes": codec.encode_reply(reply)}

    async def _control(self, frame: dict[str, Any]) -> dict[str, Any]:
        op = frame.get("op")
        handler = CONTROL.get(op) if isinstance(op, str) else None
        if handler is None:
            raise BadRequest(f"unknown op {op!r}; expected one of {', '.join(sorted(CONTROL))}")
        return await handler(self, frame)

    async def open(self, frame: dict[str, Any]) -> dict[str, Any]:
        model = _text(frame, "model")
        version = _optional_int(frame, "version", minimum=1)
        count = _optional_int(frame, "count", minimum=1) or 1
        if count > self.max_entries:
            raise BadRequest(f"open at most {self.max_entries} sessions at once, not {count}")
        served, opened = await self.group.open(model, version, count)
        return {
            "op": "open",
            "model": served.name,
            "version": served.version,
            "input_size": served.metadata.input_size,
            "output_size": served.metadata.output_size,
            **_opened(opened),
        }

    async def attach(self, frame: dict[str, Any]) -> dict[str, Any]:
        session_ids = frame.get("session_ids")
        if not isinstance(session_ids, list) or not all(isinstance(s, str) for s in session_ids):
            raise BadRequest('"session_ids" must be a list of session id strings')
        if len(session_ids) > self.max_entries:
            raise BadRequest(f"attach at most {self.max_entries} sessions at once")
        results = await self.group.attach(session_ids)
        handles = [r.handle if isinstance(r, Opened) else None for r in results]
        counts = [r.step_count if isinstance(r, Opened) else None for r in results]
        return {"op": "attach", "handles": handles, "step_counts": counts, **_errors(results)}

    async def close(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "close", **_errors(await self.group.close(_handles(frame)))}

    async def detach(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "detach", **_errors(self.group.detach(_handles(frame)))}

    async def reset(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"op": "reset", **_errors(await self.group.reset(_handles(frame)))}

    async def step(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The JSON form of a step frame."""
        handles = np.array(_handles(frame), np.int32)
        inputs = _inputs(frame.get("inputs"), len(handles))
        expected = frame.get("expected_step_counts")
        counts = None
        if expected is not None:
            if not isinstance(expected, list) or len(expected) != len(handles):
                raise BadRequest('"expected_step_counts" must hold one integer per handle')
            counts = np.array([_integer(v, "expected_step_counts") for v in expected], np.int64)
        _check_frame_size(inputs.shape, self.max_entries, self.max_steps)
        return {"op": "step", **_result(await self.group.step(handles, inputs, counts))}


CONTROL: dict[str, ControlOp] = {
    "open": _Mux.open,
    "attach": _Mux.attach,
    "close": _Mux.close,
    "detach": _Mux.detach,
    "reset": _Mux.reset,
    "step": _Mux.step,
}


def _opened(opened: list[Opened]) -> dict[str, list[Any]]:
    return {
        "handles": [o.handle for o in opened],
        "session_ids": [o.session_id for o in opened],
        "step_counts": [o.step_count for o in opened],
    }


def _errors(results: list[Any]) -> dict[str, Any]:
    """``{"errors": {index: message}}`` for the entries that failed, or nothing."""
    errors = {str(i): r.message for i, r in enumerate(results) if isinstance(r, ServiceError)}
    return {"errors": errors} if errors else {}


def _result(result: FrameResult) -> dict[str, Any]:
    return {
        "status": result.status.tolist(),
        "step_counts": result.step_counts.tolist(),
        "outputs": result.outputs,  # NaN (JSON null) for the entries that failed
        **({"errors": {str(i): m for i, m in result.messages.items()}} if result.messages else {}),
    }


def _text(frame: dict[str, Any], key: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{key}" must be a non-empty string')
    return value


def _integer(value: Any, key: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise BadRequest(f'"{key}" must hold integers >= {minimum}, got {value!r:.40}')
    return value


def _optional_int(frame: dict[str, Any], key: str, minimum: int) -> int | None:
    value = frame.get(key)
    return None if value is None else _integer(value, key, minimum)


def _handles(frame: dict[str, Any]) -> list[int]:
    handles = frame.get("handles")
    if not isinstance(handles, list) or not handles:
        raise BadRequest('"handles" must be a non-empty list of integers')
    if any(type(h) is not int or not INT32_MIN <= h <= INT32_MAX for h in handles):
        raise BadRequest('"handles" must hold 32-bit integers')
    return handles


def _inputs(raw: Any, entries: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The JSON inputs of a step: K lists of T steps of n numbers."""
    try:
        inputs = np.array(raw, dtype=np.float32)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(
            '"inputs" must be K x T x n numbers (one list of steps per handle)'
        ) from None
    if inputs.ndim != 3 or inputs.shape[0] != entries:
        raise BadRequest(
            f'"inputs" must be K x T x n numbers with K = {entries} handles, got shape '
            f"{list(inputs.shape)}"
        )
    return inputs


def _check_frame_size(shape: tuple[int, ...], max_entries: int, max_steps: int) -> None:
    entries, steps, n = shape
    if not 1 <= entries <= max_entries:
        raise BadRequest(f"a frame carries 1 to {max_entries} entries, not {entries}")
    if not 1 <= steps <= max_steps or n < 1:
        raise BadRequest(f"each entry carries 1 to {max_steps} steps, not {steps}")
