"""One session's stream over the ``/v1/stream`` websocket, resumed across dropped connections.

The protocol: the server's first frame announces the session (``session_id``, ``model``,
``version``, ``step_count``); every client frame ``{"inputs": [[...], ...],
"expected_step_count": N}`` gets exactly one reply ``{"outputs": [[...], ...], "step_count":
N + T}`` or ``{"error": "..."}``, in order; a frame applies only if the session is at step N.

Resuming is exact. The client keeps every row the server has not acknowledged. After a reconnect
the announced ``step_count`` says how many steps the session has applied: a chunk that was sent
but whose reply was lost may or may not have been applied, and only that count tells. Rows already
applied are never sent again (their outputs are reported as lost); the others are resent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from service.client.connection import (
    SESSION_NOT_FOUND,
    ConnectionLost,
    StreamClosed,
    StreamConnection,
    websocket_url,
)
from service.client.series import ClientError, Row

STREAM_PATH = "/v1/stream"


@dataclass(frozen=True)
class StreamTarget:
    """Where to stream: a server, and a new session of a model or an existing session."""

    url: str  # ws://host:port or http://host:port; the /v1/stream path is added if missing
    model: str | None = None  # open a new session of this model ...
    version: int | None = None  # ... at this version (None: the model's default)
    session_id: str | None = None  # ... or resume this existing session
    api_key: str | None = None  # sent as "Authorization: Bearer <key>"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.session_id is None):
            raise ClientError("give either a model (a new session) or a session id (resume)")
        if self.version is not None and self.version < 1:
            raise ClientError(f"version must be a positive integer, got {self.version}")

    def stream_url(self, session_id: str | None) -> str:
        """The websocket URL that opens the session, or resumes ``session_id`` when given."""
        query: dict[str, str] = {}
        if session_id is not None:
            query["session_id"] = session_id
        else:
            query["model"] = str(self.model)
            if self.version is not None:
                query["version"] = str(self.version)
        return websocket_url(self.url, STREAM_PATH, query)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with a bounded number of consecutive failed attempts."""

    max_retries: int = 5  # reconnection attempts in a row before giving up
    initial_delay: float = 0.2  # seconds before the first retry
    max_delay: float = 5.0  # cap on the delay between two attempts

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ClientError(f"max retries must be >= 0, got {self.max_retries}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.initial_delay * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class Hello:
    """The server's first frame on every connection."""

    session_id: str
    model: str
    version: int
    step_count: int


@dataclass(frozen=True)
class StepResult:
    """One step's prediction: the session's step index (0-based), its input and its output."""

    index: int
    inputs: Row
    outputs: list[float]


class StreamClient:
    """Streams rows into one session, chunk by chunk, and yields each step's output in order.

    ``notify`` receives one-line notices (reconnects, steps whose replies were lost); the CLI
    prints them on stderr. ``append`` matters only when resuming an existing session: by default
    the rows are the whole series from the session's first step and the rows it already applied
    are skipped; with ``append`` every row is a new step.
    """

    def __init__(
        self,
        target: StreamTarget,
        *,
        chunk_size: int = 1,
        retry: RetryPolicy | None = None,
        reply_timeout: float = 30.0,
        append: bool = False,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ClientError(f"chunk size must be >= 1, got {chunk_size}")
        self.target = target
        self.chunk_size = chunk_size
        self.retry = retry or RetryPolicy()
        self.reply_timeout = reply_timeout
        self.append = append
        self.notify = notify or (lambda message: None)
        self.session: Hello | None = None  # the latest announcement
        self.reconnects = 0
        self.lost_steps: list[int] = []  # applied steps whose replies never arrived
        self._acked = 0  # session steps acknowledged (or known applied) so far
        self._pending: deque[Row] = deque()  # rows not acknowledged, from step self._acked

    @property
    def step_count(self) -> int:
        """Steps the session is known to have applied."""
        return self._acked

    async def stream(self, rows: Iterable[Row]) -> AsyncIterator[StepResult]:
        """Send every row, reconnecting as needed; yield each step's result as it arrives."""
        source = iter(rows)
        failures = 0
        while True:
            try:
                async with self._connect() as ws:
                    await self._attach(ws, source)
                    failures = 0
                    async for result in self._exchange_all(ws, source):
                        yield result
                    return
            except StreamClosed as exc:
                if exc.code == SESSION_NOT_FOUND and self.session is not None:
                    raise ClientError(self._session_gone_message(exc)) from None
                raise
            except ConnectionLost as exc:
                failures += 1
                if failures > self.retry.max_retries:
                    raise ClientError(self._give_up_message(exc)) from None
                delay = self.retry.delay(failures)
                self.notify(f"connection lost ({exc}); retry {failures} in {delay:.1f} s")
                await asyncio.sleep(delay)
                self.reconnects += 1

    def _session_gone_message(self, exc: StreamClosed) -> str:
        assert self.session is not None
        return (
            f"session {self.session.session_id} is gone (expired, deleted, or the server "
            f"restarted) after {self._acked} acknowledged steps; {exc}"
        )

    def _give_up_message(self, exc: ConnectionLost) -> str:
        attempts = self.retry.max_retries + 1
        where = self.target.stream_url(self.session.session_id if self.session else None)
        message = f"cannot reach {where} after {attempts} attempts: {exc}"
        if self.session is not None:
            message += f" ({self._acked} steps of session {self.session.session_id} applied)"
        return message

    def _connect(self) -> StreamConnection:
        session_id = self.session.session_id if self.session else self.target.session_id
        headers = {}
        if self.target.api_key:
            headers["Authorization"] = f"Bearer {self.target.api_key}"
        return StreamConnection(self.target.stream_url(session_id), headers, self.reply_timeout)

    async def _attach(self, ws: StreamConnection, source: Iterator[Row]) -> None:
        hello = _parse_hello(await ws.receive())
        if self.session is None:
            self._start(hello, source)
        else:
            self._realign(hello)
        self.session = hello

    def _start(self, hello: Hello, source: Iterator[Row]) -> None:
        """First connection: a new session starts at 0; an existing one may skip applied rows."""
        self._acked = hello.step_count
        if self.target.session_id is None or self.append or hello.step_count == 0:
            return
        skipped = sum(1 for _ in zip(range(hello.step_count), source, strict=False))
        if skipped < hello.step_count:
            raise ClientError(
                f"session {hello.session_id} has already applied {hello.step_count} steps but the "
                f"input has only {skipped} rows; use --append to add them as new steps"
            )
        self.notify(f"session {hello.session_id} already applied {skipped} steps; skipping them")

    def _realign(self, hello: Hello) -> None:
        """After a reconnect: drop the pending rows the session applied before the drop."""
        assert self.session is not None
        if hello.session_id != self.session.session_id:
            raise ClientError(
                f"server resumed session {hello.session_id}, not {self.session.session_id}"
            )
        applied = hello.step_count - self._acked
        if not 0 <= applied <= len(self._pending):
            raise ClientError(
                f"session {hello.session_id} reports {hello.step_count} steps after reconnecting, "
                f"but {self._acked} were acknowledged and {len(self._pending)} were in flight; "
                "another client may be streaming to it"
            )
        if applied:
            lost = list(range(self._acked, hello.step_count))
            self.lost_steps.extend(lost)
            self.notify(
                f"steps {lost[0]}..{lost[-1]} were applied but their replies were lost with the "
                "connection; they are not resent"
            )
            for _ in range(applied):
                self._pending.popleft()
            self._acked = hello.step_count
        self.notify(f"resumed session {hello.session_id} at step {hello.step_count}")

    async def _exchange_all(
        self, ws: StreamConnection, source: Iterator[Row]
    ) -> AsyncIterator[StepResult]:
        while True:
            if not self._pending:
                self._pending.extend(await asyncio.to_thread(_take, source, self.chunk_size))
            if not self._pending:
                return
            chunk = [self._pending[i] for i in range(min(self.chunk_size, len(self._pending)))]
            outputs = await self._exchange(ws, chunk)
            first = self._acked
            for _ in chunk:
                self._pending.popleft()
            self._acked += len(chunk)
            for offset, (row, output) in enumerate(zip(chunk, outputs, strict=True)):
                yield StepResult(first + offset, row, output)

    async def _exchange(self, ws: StreamConnection, chunk: list[Row]) -> list[list[float]]:
        # The session must be where this client left it: another writer makes the step fail
        # instead of interleaving with ours.
        await ws.send({"inputs": chunk, "expected_step_count": self._acked})
        reply = await ws.receive()
        last = self._acked + len(chunk) - 1
        if "error" in reply:
            raise ClientError(f"server rejected steps {self._acked}..{last}: {reply['error']}")
        outputs, step_count = reply.get("outputs"), reply.get("step_count")
        if not isinstance(outputs, list) or len(outputs) != len(chunk):
            raise ClientError(f"malformed reply to steps {self._acked}..{last}: {reply}")
        if step_count != self._acked + len(chunk):
            raise ClientError(
                f"server reports step_count {step_count} after steps {self._acked}..{last}, "
                f"expected {last + 1}; another client may be streaming to this session"
            )
        return [_as_floats(output) for output in outputs]


def _take(source: Iterator[Row], count: int) -> list[Row]:
    """Up to ``count`` rows; run in a thread because standard input blocks."""
    return [row for _, row in zip(range(count), source, strict=False)]


def _as_floats(output: Any) -> list[float]:
    values = output if isinstance(output, list) else [output]
    return [float(value) for value in values]


def _parse_hello(frame: dict[str, Any]) -> Hello:
    if "error" in frame:
        raise ClientError(f"server refused the stream: {frame['error']}")
    try:
        return Hello(
            session_id=str(frame["session_id"]),
            model=str(frame["model"]),
            version=int(frame["version"]),
            step_count=int(frame["step_count"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ClientError(f"malformed session announcement from the server: {frame}") from None
