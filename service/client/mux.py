"""A client of the multiplexed stream ``/v1/mux``: many sessions, one connection, one frame per
step of all of them.

    async with await MuxClient.connect("ws://127.0.0.1:8000", api_key=None) as mux:
        opened = await mux.open("co2-forecaster", count=1000)
        reply = await mux.step(opened.handles, inputs)  # inputs (1000, T, n) float32
        reply.outputs  # (1000, T, o); reply.status, reply.step_counts per session

Steps travel as binary frames (``service.mux.codec``); control messages as JSON. One request is
in flight at a time, and the server answers in order. ``stream_columns`` drives the command-line
mode (``python -m service.client mux``): one session per CSV column, resumed exactly after a
dropped connection by attaching the sessions again and stepping each from its own step count.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection

from service.client.connection import (
    ConnectionLost,
    open_websocket,
    receive_message,
    send_message,
    websocket_url,
)
from service.client.series import ClientError, Row
from service.client.stream import RetryPolicy
from service.mux import codec
from service.mux.codec import StepReply

MUX_PATH = "/v1/mux"
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class MuxError(ClientError):
    """The server refused a request (an ``{"op": "error"}`` answer)."""


@dataclass(frozen=True)
class Opened:
    """Sessions opened or attached on the connection: handles, session ids, step counts."""

    handles: list[int]
    session_ids: list[str]
    step_counts: list[int]
    input_size: int = 0
    output_size: int = 0


class MuxClient:
    """One ``/v1/mux`` connection; use ``connect`` and ``async with``."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any], timeout: float) -> None:
        self._ws = ws
        self.hello = hello
        self.timeout = timeout
        self._request_id = 0

    @classmethod
    async def connect(
        cls, url: str, api_key: str | None = None, timeout: float = 30.0
    ) -> MuxClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        url = websocket_url(url, MUX_PATH)
        ws = await open_websocket(url, headers, max_size=None, compression=None)
        client = cls(ws, {}, timeout)
        client.hello = await client._receive_json()
        return client

    async def __aenter__(self) -> MuxClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._ws.close()

    # -- control ---------------------------------------------------------------------------------

    async def open(self, model: str, count: int = 1, version: int | None = None) -> Opened:
        """Open ``count`` new sessions of ``model``; all or none."""
        message: dict[str, Any] = {"op": "open", "model": model, "count": count}
        if version is not None:
            message["version"] = version
        reply = await self._control(message)
        return Opened(
            reply["handles"],
            reply["session_ids"],
            reply["step_counts"],
            reply["input_size"],
            reply["output_size"],
        )

    async def attach(self, session_ids: Sequence[str]) -> Opened:
        """Hold existing sessions on this connection; raise if any of them cannot be held."""
        reply = await self._control({"op": "attach", "session_ids": list(session_ids)})
        if reply.get("errors"):
            raise MuxError("; ".join(reply["errors"].values()))
        return Opened(reply["handles"], list(session_ids), reply["step_counts"])

    async def close(self, handles: Sequence[int]) -> dict[str, str]:
        """Delete the sessions; returns the errors by entry index (empty when all closed)."""
        return await self._per_handle("close", handles)

    async def detach(self, handles: Sequence[int]) -> dict[str, str]:
        """Let go of the sessions (they live on for another connection)."""
        return await self._per_handle("detach", handles)

    async def reset(self, handles: Sequence[int]) -> dict[str, str]:
        """Zero the sessions' states and step counts."""
        return await self._per_handle("reset", handles)

    async def _per_handle(self, op: str, handles: Sequence[int]) -> dict[str, str]:
        reply = await self._control({"op": op, "handles": list(handles)})
        return dict(reply.get("errors", {}))

    # -- steps -----------------------------------------------------------------------------------

    async def step(
        self,
        handles: Sequence[int] | npt.NDArray[np.int32],
        inputs: FloatArray,
        expected_step_counts: Sequence[int] | npt.NDArray[np.int64] | None = None,
    ) -> StepReply:
        """Step the sessions under ``handles`` (K,) with ``inputs`` (K, T, n) in one frame."""
        self._request_id += 1
        expected = None if expected_step_counts is None else np.asarray(expected_step_counts)
        frame = codec.StepFrame(
            np.asarray(handles, np.int32),
            np.asarray(inputs, np.float32),
            expected,
            self._request_id,
        )
        await self._send(codec.encode_step(frame))
        message = await self._receive()
        if isinstance(message, str):
            raise MuxError(_error_of(json.loads(message)))
        return codec.decode_reply(message)

    # -- plumbing --------------------------------------------------------------------------------

    async def _control(self, message: dict[str, Any]) -> dict[str, Any]:
        self._request_id += 1
        await self._send(json.dumps({**message, "request_id": self._request_id}))
        reply = await self._receive_json()
        if reply.get("op") == "error":
            raise MuxError(_error_of(reply))
        return reply

    async def _send(self, data: str | bytes) -> None:
        await send_message(self._ws, data)

    async def _receive(self) -> str | bytes:
        return await receive_message(self._ws, self.timeout)

    async def _receive_json(self) -> dict[str, Any]:
        message = await self._receive()
        if isinstance(message, bytes):
            raise ClientError("the server sent a binary frame where JSON was expected")
        reply: dict[str, Any] = json.loads(message)
        return reply


def _shortest(value: np.float32) -> float:
    """A float32 as the Python float of its shortest decimal form (as JSON replies give it)."""
    return float(str(value))


def _error_of(reply: dict[str, Any]) -> str:
    return str(reply.get("error", reply))


@dataclass(frozen=True)
class ColumnStep:
    """One step of one column's session: the column, the session's step index, input, output."""

    column: str
    index: int
    inputs: Row
    outputs: list[float]
    column_index: int = 0


async def stream_columns(
    url: str,
    model: str,
    columns: Sequence[str],
    rows: Sequence[Row],
    *,
    api_key: str | None = None,
    version: int | None = None,
    retry: RetryPolicy | None = None,
    notify: Any = None,
) -> AsyncIterator[ColumnStep]:
    """Stream each column through a session of its own, one frame per row for all of them.

    After a dropped connection the sessions are attached again; each one's step count says which
    rows it applied, and every frame carries the expected step counts, so no row is applied
    twice and none is skipped.
    """
    retry = retry or RetryPolicy()
    say = notify or (lambda message: None)
    session_ids: list[str] | None = None
    acked = np.zeros(len(columns), np.int64)  # steps whose outputs were yielded, per column
    failures = 0
    while True:
        try:
            async with await MuxClient.connect(url, api_key) as mux:
                if session_ids is None:
                    opened = await mux.open(model, len(columns), version)
                    if opened.input_size != 1:
                        raise ClientError(
                            f"model {model!r} takes {opened.input_size} inputs per step; the mux "
                            "command streams one column (one input) per session"
                        )
                    session_ids = opened.session_ids
                else:
                    opened = await mux.attach(session_ids)
                    _report_lost(columns, acked, np.array(opened.step_counts), say)
                failures = 0
                async for step in _frames(mux, opened, columns, rows):
                    acked[step.column_index] = step.index + 1
                    yield step
                await mux.close(opened.handles)
                return
        except ConnectionLost as exc:
            failures += 1
            if failures > retry.max_retries:
                raise ClientError(f"cannot reach {url} after {failures} attempts: {exc}") from None
            delay = retry.delay(failures)
            say(f"connection lost ({exc}); retry {failures} in {delay:.1f} s")
            await asyncio.sleep(delay)


def _report_lost(columns: Sequence[str], acked: IntArray, applied: IntArray, say: Any) -> None:
    """Say which steps the sessions applied but whose replies the dropped connection lost."""
    for column, first, count in zip(columns, acked.tolist(), applied.tolist(), strict=True):
        if count > first:
            say(
                f"column {column!r}: steps {first}..{count - 1} were applied but their replies "
                "were lost with the connection; they are not resent"
            )
    say(f"resumed {len(columns)} sessions at steps {sorted(set(applied.tolist()))}")


async def _frames(
    mux: MuxClient, opened: Opened, columns: Sequence[str], rows: Sequence[Row]
) -> AsyncIterator[ColumnStep]:
    """Send every session its next row until each has applied all rows."""
    done = np.array(opened.step_counts, np.int64)  # rows applied, per session
    handles = np.array(opened.handles, np.int32)
    table = np.array(rows, np.float32).reshape(len(rows), len(columns))  # (rows, columns)
    while (active := np.flatnonzero(done < len(rows))).size:
        inputs = table[done[active], active][:, None, None]  # (k, 1, 1)
        reply = await mux.step(handles[active], inputs, done[active])
        if reply.messages:
            entry, message = next(iter(reply.messages.items()))
            raise ClientError(f"server refused column {columns[int(active[entry])]!r}: {message}")
        for k, column in enumerate(active.tolist()):
            index = int(done[column])
            output = [_shortest(value) for value in reply.outputs[k, 0]]
            yield ColumnStep(columns[column], index, [rows[index][column]], output, column)
        done[active] += 1
