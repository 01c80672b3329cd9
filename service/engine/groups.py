"""Sessions stepped together: the engine side of the multiplexed stream ``/v1/mux``.

A gateway streams thousands of sensors through one connection. Its ``StreamGroup`` holds each of
its sessions under a small integer handle; a step names K handles and carries their inputs
(K, T, n), and the group runs them as one bulk request per model through the batcher, checking,
dispatching and collecting with array operations instead of per-session Python work. Each entry
succeeds or fails on its own, with an ``EntryStatus`` and a message; the other entries still step.

Holding: the group takes each session's lock when it opens or attaches it and keeps it until it
lets go, so a frame steps its sessions without a lock per step, and the session's step count
lives in the group's arrays meanwhile. Every other path refuses to step, reset or close a held
session (409); reading it works; attaching it elsewhere takes it over through ``surrender``:
the group lets go after its frame in flight, and the handle answers ``SESSION_GONE`` until the
client closes or detaches it. Handles are scoped to the group, and so to one connection and one
API key (a session of another key is not found).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from service.engine.batcher import BulkResult
from service.engine.errors import InvalidInput, NonFiniteOutput, ServiceError, StepCountMismatch
from service.engine.models import ServedModel
from service.engine.runtime import FloatArray
from service.engine.sessions import Session, SessionState
from service.engine.store.errors import OutcomeUnknown

if TYPE_CHECKING:
    from service.engine.dataplane import DataPlane

IntArray = npt.NDArray[np.int64]
INITIAL_HANDLES = 64


class EntryStatus(IntEnum):
    """How one entry of a step frame went (docs/reference/mux.md lists them)."""

    OK = 0
    UNKNOWN_HANDLE = 1  # not open on this connection (never opened, closed or detached)
    DUPLICATE_HANDLE = 2  # the handle appears more than once in the frame
    WRONG_SIZE = 3  # the session's model takes another number of inputs per step
    NOT_FINITE_INPUT = 4  # NaN or infinity among the entry's inputs
    STEP_COUNT_MISMATCH = 5  # the session is not at the expected step count
    SESSION_GONE = 6  # taken over by another connection, deleted, or its model unloaded
    NOT_FINITE_OUTPUT = 7  # the model produced NaN or infinity; the state is unchanged
    UNAVAILABLE = 8  # queue full, session store unreachable, shutting down: retry
    FAILED = 9  # the model failed on this batch
    OUTCOME_UNKNOWN = 10  # the store did not confirm the write; step_count is the last known


@dataclass(frozen=True)
class Opened:
    """A session a group holds: its handle, id and step count."""

    handle: int
    session_id: str
    step_count: int


@dataclass
class FrameResult:
    """The answer to a step frame: per entry a status (K,), the step count after the frame (K,;
    -1 where the handle names no session) and the outputs (K, T, o), NaN for failed entries;
    ``messages`` says what went wrong, per failed entry index."""

    status: npt.NDArray[np.uint8]
    step_counts: IntArray
    outputs: FloatArray
    messages: dict[int, str] = field(default_factory=dict)


class StreamGroup:
    """The sessions one mux connection holds, each under a small integer handle."""

    def __init__(self, dataplane: DataPlane, owner: str | None) -> None:
        self._plane = dataplane
        self.owner = owner
        self.busy = False  # a frame is running (the data plane's drain waits for it)
        self._sessions: list[Session | None] = []
        self._attachments: list[int] = []
        self._slots = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.int64)
        self._model_ix = np.zeros(0, np.int64)
        self._input_size = np.zeros(0, np.int64)
        self._status = np.zeros(0, np.uint8)
        self._gone: dict[int, str] = {}  # handle -> why its session is gone
        self._handle_of: dict[str, int] = {}  # session id -> handle
        self._models: list[ServedModel] = []
        self._free: list[int] = []  # released handles, reused lowest first
        self._let_go_after_frame: list[int] = []
        self._grow(INITIAL_HANDLES)
        dataplane.groups.add(self)

    # -- the handle table ------------------------------------------------------------------------

    def step_count(self, session: Session) -> int:
        """The held session's step count (``Holder`` protocol)."""
        return int(self._counts[self._handle_of[session.id]])

    def surrender(self, session: Session, reason: str | None = None) -> None:
        """Let go of ``session`` for a taker (``Holder`` protocol): now, or after the frame in
        flight; the handle answers ``SESSION_GONE`` with ``reason`` until it is closed."""
        handle = self._handle_of.get(session.id)
        if handle is None:
            return
        self._status[handle] = EntryStatus.SESSION_GONE
        self._gone[handle] = reason or f"session {session.id!r} was taken over by another stream"
        if self.busy:
            self._let_go_after_frame.append(handle)
        else:
            self._let_go(handle)

    def _grow(self, capacity: int) -> None:
        old = len(self._sessions)
        extra = capacity - old
        self._sessions.extend([None] * extra)
        self._attachments.extend([0] * extra)
        self._slots = np.concatenate([self._slots, np.zeros(extra, np.int64)])
        self._counts = np.concatenate([self._counts, np.zeros(extra, np.int64)])
        self._model_ix = np.concatenate([self._model_ix, np.zeros(extra, np.int64)])
        self._input_size = np.concatenate([self._input_size, np.zeros(extra, np.int64)])
        unknown = np.full(extra, EntryStatus.UNKNOWN_HANDLE, np.uint8)
        self._status = np.concatenate([self._status, unknown])
        for handle in range(old, capacity):
            heapq.heappush(self._free, handle)

    def _new_handle(self) -> int:
        if not self._free:
            self._grow(2 * len(self._sessions))
        return heapq.heappop(self._free)

    def _model_index(self, model: ServedModel) -> int:
        for index, known in enumerate(self._models):
            if known is model:
                return index
        self._models.append(model)
        return len(self._models) - 1

    async def _hold(self, session: Session, created: bool = False) -> Opened:
        """Take ``session`` for this group: its lock, a handle, its step count. A session the
        group has just ``created`` is as stored: no other replica can know its id yet."""
        session.holder = self  # from now on other paths refuse it; queued ones finish first
        await session.lock.acquire()
        try:
            if not created:
                await self._plane.refresh(session)  # another replica may have advanced it
            session.require(SessionState.OPEN, SessionState.STREAMING)
        except BaseException:
            session.lock.release()
            if session.holder is self:
                session.holder = None
            raise
        handle = self._new_handle()
        model = session.model
        self._sessions[handle] = session
        self._attachments[handle] = self._plane.sessions.attach(session)
        self._handle_of[session.id] = handle
        self._slots[handle] = session.slot
        self._counts[handle] = session.step_count
        self._model_ix[handle] = self._model_index(model)
        self._input_size[handle] = model.metadata.input_size
        self._status[handle] = EntryStatus.OK
        return Opened(handle, session.id, session.step_count)

    def _let_go(self, handle: int) -> None:
        """Give the session back to the ordinary paths (the handle stays until released)."""
        session = self._sessions[handle]
        if session is None or self._handle_of.get(session.id) != handle:
            return
        del self._handle_of[session.id]
        session.step_count = int(self._counts[handle])
        if session.holder is self:
            session.holder = None
        self._plane.sessions.detach(session, self._attachments[handle])
        session.lock.release()

    def _release_handle(self, handle: int) -> None:
        self._let_go(handle)
        self._sessions[handle] = None
        self._status[handle] = EntryStatus.UNKNOWN_HANDLE
        self._gone.pop(handle, None)
        heapq.heappush(self._free, handle)

    def _held_session(self, handle: int) -> Session:
        """The session under ``handle``, or a ``ServiceError`` saying why there is none."""
        if not 0 <= handle < len(self._sessions) or self._sessions[handle] is None:
            raise InvalidInput(f"handle {handle} is not open on this connection")
        if self._status[handle] != EntryStatus.OK:
            raise InvalidInput(self._gone.get(handle, f"handle {handle} is not usable"))
        session = self._sessions[handle]
        assert session is not None
        return session

    # -- opening, attaching, closing -------------------------------------------------------------

    async def open(
        self, name: str, version: int | None, count: int
    ) -> tuple[ServedModel, list[Opened]]:
        """Open ``count`` new sessions of a model version (default: the highest); all of them,
        or none (the error)."""
        model = self._plane.model(name, version)
        created: list[Session] = []
        try:
            for _ in range(count):
                info = await self._plane.create_session(name, model.version, self.owner)
                created.append(self._plane.sessions.get(info.session_id, self.owner))
            return model, [await self._hold(session, created=True) for session in created]
        except BaseException:
            for session in created:
                await self._discard(session)
            raise

    async def _discard(self, session: Session) -> None:
        """Delete a session this group created but could not hand out."""
        handle = self._handle_of.get(session.id)
        if handle is not None:
            self._release_handle(handle)
        if session.state in (SessionState.OPEN, SessionState.STREAMING):
            await self._plane.delete(session.id, self.owner)

    async def attach(self, session_ids: Sequence[str]) -> list[Opened | ServiceError]:
        """Hold existing sessions (taking them over from another stream); per id the opened
        handle, or the error (unknown session, another key's, ...)."""
        results: list[Opened | ServiceError] = []
        for session_id in session_ids:
            try:
                results.append(await self._attach_one(session_id))
            except ServiceError as exc:
                results.append(exc)
        return results

    async def _attach_one(self, session_id: str) -> Opened:
        session = await self._plane.find_session(session_id, self.owner)
        handle = self._handle_of.get(session.id)
        if handle is not None:
            return Opened(handle, session.id, int(self._counts[handle]))
        if session.holder is not None:
            session.holder.surrender(session)
        return await self._hold(session)

    async def close(self, handles: Sequence[int]) -> list[ServiceError | None]:
        """Delete the sessions under ``handles`` (a gone handle is just released)."""
        results: list[ServiceError | None] = []
        for handle in handles:
            try:
                await self._close_one(handle)
                results.append(None)
            except ServiceError as exc:
                results.append(exc)
        return results

    async def _close_one(self, handle: int) -> None:
        if 0 <= handle < len(self._sessions) and handle in self._gone:
            self._release_handle(handle)  # its session is gone already: forget the handle
            return
        session = self._held_session(handle)
        if self._plane.store is not None:
            await self._plane.store.delete(session.id)
        del self._handle_of[session.id]
        session.holder = None
        self._plane.sessions.close(session)
        session.lock.release()
        self._release_handle(handle)

    def detach(self, handles: Sequence[int]) -> list[ServiceError | None]:
        """Let go of the sessions under ``handles``; they live on for another stream."""
        results: list[ServiceError | None] = []
        for handle in handles:
            try:
                if handle not in self._gone:
                    self._held_session(handle)
                self._release_handle(handle)
                results.append(None)
            except ServiceError as exc:
                results.append(exc)
        return results

    async def reset(self, handles: Sequence[int]) -> list[ServiceError | None]:
        """Zero the state and step count of the sessions under ``handles``."""
        results: list[ServiceError | None] = []
        for handle in handles:
            try:
                await self._plane.zero(self._held_session(handle))
                self._counts[handle] = 0
                results.append(None)
            except ServiceError as exc:
                results.append(exc)
        return results

    def release_all(self) -> None:
        """Let go of every session (the connection ended); they live on until their TTL."""
        for handle in list(self._handle_of.values()):
            self._let_go(handle)
        self._plane.groups.discard(self)

    # -- stepping --------------------------------------------------------------------------------

    async def step(
        self, handles: npt.NDArray[np.int32], x: FloatArray, expected: IntArray | None
    ) -> FrameResult:
        """Run one frame: ``x`` (K, T, n) for the sessions under ``handles`` (K,), each entry
        applied only at its ``expected`` step count when given (K,)."""
        self.busy = True
        try:
            with self._plane.metrics.track("mux_step"):
                return await self._step(handles, x, expected)
        finally:
            self.busy = False
            later, self._let_go_after_frame = self._let_go_after_frame, []
            for handle in later:
                self._let_go(handle)

    async def _step(
        self, handles: npt.NDArray[np.int32], x: FloatArray, expected: IntArray | None
    ) -> FrameResult:
        started = time.perf_counter()
        frame = _Frame(self, handles, x, expected)
        runs = [(model, rows, self._submit(model, frame, rows)) for model, rows in frame.by_model()]
        for model, rows, submitted in runs:
            await self._collect(model, rows, submitted, frame)
        for model, _, _ in runs:
            self._plane.metrics.observe_step(model.name, model.version, started)
        return frame.result()

    def _submit(
        self, model: ServedModel, frame: _Frame, rows: npt.NDArray[np.intp]
    ) -> asyncio.Future[BulkResult] | ServiceError:
        x = frame.x if len(rows) == len(frame.x) else frame.x[rows]  # (k, T, n)
        try:
            return model.batcher.submit_bulk(x, self._slots[frame.handles[rows]])
        except ServiceError as exc:  # the queue is full, or the batcher stopped
            return exc

    async def _collect(
        self,
        model: ServedModel,
        rows: npt.NDArray[np.intp],
        submitted: asyncio.Future[BulkResult] | ServiceError,
        frame: _Frame,
    ) -> None:
        """Record the outcome of one model's bulk request in the frame's result."""
        try:
            if isinstance(submitted, ServiceError):
                raise submitted
            result = await submitted
        except ServiceError as exc:
            frame.fail(rows, _status_of(exc), exc.message)
            return
        not_ok = rows[~result.ok]
        if not_ok.size:
            message = NonFiniteOutput(model.name, model.version).message
            frame.fail(not_ok, EntryStatus.NOT_FINITE_OUTPUT, message)
        stepped = np.flatnonzero(result.ok)  # positions in ``rows`` whose new state was stored
        if self._plane.store is not None:
            stepped = await self._store(frame, rows, stepped, result)
        frame.outputs[rows[stepped], :, : model.metadata.output_size] = result.y[stepped]
        self._counts[frame.handles[rows[stepped]]] += frame.x.shape[1]

    async def _store(
        self,
        frame: _Frame,
        rows: npt.NDArray[np.intp],
        stepped: npt.NDArray[np.intp],
        result: BulkResult,
    ) -> npt.NDArray[np.intp]:
        """Write each stepped session's new state to the durable store (one pipeline); return
        the positions in ``rows`` whose write the store confirmed."""
        states = result.states()  # (S, L, k, m)
        steps = frame.x.shape[1]
        writes = [
            self._store_one(int(frame.handles[rows[i]]), states[:, :, i], steps) for i in stepped
        ]
        outcomes = await asyncio.gather(*writes)
        stored = []
        for i, outcome in zip(stepped, outcomes, strict=True):
            if outcome is None:
                stored.append(i)
            else:
                frame.fail(rows[i : i + 1], _status_of(outcome), outcome.message)
        return np.array(stored, np.intp)

    async def _store_one(self, handle: int, state: FloatArray, steps: int) -> ServiceError | None:
        session = self._sessions[handle]
        assert session is not None
        try:
            count = int(self._counts[handle])
            await self._plane.save(session, state, step_count=count + steps, stored_count=count)
        except ServiceError as exc:
            # This replica's copy is ahead of the store: drop it, and the handle with it.
            self._status[handle] = EntryStatus.SESSION_GONE
            self._gone[handle] = exc.message
            self._let_go(handle)
            self._plane.sessions.evict(session, "store")
            return exc
        return None


class _Frame:
    """One step frame being answered: its entries' statuses, checked with array operations."""

    def __init__(
        self,
        group: StreamGroup,
        handles: npt.NDArray[np.int32],
        x: FloatArray,
        expected: IntArray | None,
    ) -> None:
        k, steps, n = x.shape
        self.group, self.x = group, x
        known = (handles >= 0) & (handles < len(group._sessions))
        self.handles = np.where(known, handles, 0).astype(np.intp)  # (K,) safe to index with
        self.status = np.where(known, group._status[self.handles], EntryStatus.UNKNOWN_HANDLE)
        self.status = self.status.astype(np.uint8)
        held = self.status == EntryStatus.OK
        self.step_counts = np.where(held, group._counts[self.handles], -1)  # (K,)
        outputs = max((m.metadata.output_size for m in group._models), default=0)
        self.outputs = np.full((k, steps, outputs), np.nan, np.float32)  # (K, T, o)
        self.messages: dict[int, str] = {}
        self.expected, self.raw_handles = expected, handles
        _, inverse, counts = np.unique(handles, return_inverse=True, return_counts=True)
        self._mark(counts[inverse] > 1, EntryStatus.DUPLICATE_HANDLE)
        self._mark(group._input_size[self.handles] != n, EntryStatus.WRONG_SIZE)
        if not np.isfinite(x).all():
            self._mark(~np.asarray(np.isfinite(x).all(axis=(1, 2))), EntryStatus.NOT_FINITE_INPUT)
        if expected is not None:
            self._mark(expected != self.step_counts, EntryStatus.STEP_COUNT_MISMATCH)

    def _mark(self, failing: npt.NDArray[np.bool_], status: EntryStatus) -> None:
        """Set ``status`` on the entries that are still fine and ``failing``."""
        self.status[(self.status == EntryStatus.OK) & failing] = status

    def by_model(self) -> list[tuple[ServedModel, npt.NDArray[np.intp]]]:
        """The entries to run, grouped by model: (model, sorted entry indices)."""
        ok = np.flatnonzero(self.status == EntryStatus.OK)
        models = self.group._model_ix[self.handles[ok]]
        if len(self.group._models) == 1 or not ok.size:
            return [(self.group._models[0], ok)] if ok.size else []
        return [(self.group._models[int(ix)], ok[models == ix]) for ix in np.unique(models)]

    def fail(self, rows: npt.NDArray[np.intp], status: EntryStatus, message: str) -> None:
        self.status[rows] = status
        for row in rows:
            self.messages[int(row)] = message

    def result(self) -> FrameResult:
        done = self.status == EntryStatus.OK
        held = self.step_counts >= 0
        self.step_counts[held] = self.group._counts[self.handles[held]]
        for index in np.flatnonzero(~done):
            self.messages.setdefault(int(index), self._message(int(index)))
        return FrameResult(self.status, self.step_counts, self.outputs, self.messages)

    def _message(self, index: int) -> str:
        """Why entry ``index`` failed a check before it ran."""
        status = EntryStatus(int(self.status[index]))
        handle = int(self.raw_handles[index])
        group = self.group
        if status is EntryStatus.UNKNOWN_HANDLE:
            return f"handle {handle} is not open on this connection"
        if status is EntryStatus.SESSION_GONE:
            return group._gone.get(handle, f"the session under handle {handle} is gone")
        session = group._sessions[handle]
        assert session is not None
        if status is EntryStatus.DUPLICATE_HANDLE:
            return f"handle {handle} appears more than once in the frame"
        if status is EntryStatus.WRONG_SIZE:
            size = session.model.metadata.input_size
            return (
                f"session {session.id!r} takes {size} inputs per step; the frame has "
                f"{self.x.shape[2]}"
            )
        if status is EntryStatus.NOT_FINITE_INPUT:
            return f"the inputs of handle {handle} hold NaN or infinity"
        if status is EntryStatus.STEP_COUNT_MISMATCH:
            assert self.expected is not None
            found = int(self.step_counts[index])
            return StepCountMismatch(session.id, int(self.expected[index]), found).message
        return f"entry {index} failed ({status.name})"


def _status_of(error: ServiceError) -> EntryStatus:
    if isinstance(error, OutcomeUnknown):
        return EntryStatus.OUTCOME_UNKNOWN
    if error.status_code == 503:
        return EntryStatus.UNAVAILABLE
    if error.status_code in (404, 409):
        return EntryStatus.SESSION_GONE
    return EntryStatus.FAILED
