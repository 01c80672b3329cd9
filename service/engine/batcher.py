"""Dynamic batching across sessions: one ONNX Runtime call runs chunks of many sessions at once.

Requests wait on a queue, each with its own future (a session chunk's future cannot be
cancelled, see ``StepFuture``). A request is a ``Chunk`` (one session's steps, or one stateless
sequence) or a ``BulkChunk`` (the steps of K sessions at once, from a mux frame); each occupies
one row of the batch per session. A batch closes when it holds ``max_batch_size`` rows or
``max_delay_s`` after its first request (0: whatever is queued when the previous batch ends); a
bulk chunk larger than ``max_batch_size`` runs as a batch of its own. A batch holds at most one
row per state slot, so a session's chunks run in order (a bulk chunk's sessions are held by its
mux stream and reach the batcher no other way). Rows of different lengths are padded to the
longest and run with ``lengths``. The states of a batch are gathered from the pool before the
call and scattered back only if the call succeeded, and only for rows whose outputs and new
state are finite: a row that produced NaN or infinity keeps its old state and fails with
``NonFiniteOutput`` (a bulk chunk reports it per row). A failed call is retried in halves, so
exactly the failing request fails (with a clear error) and every failed row's state stays as it
was.

With a ``DevicePool`` the states of session chunks never reach the host: the pool runs gather,
model and scatter as one call on the device (``DevicePool.step``), and a chunk's new state is
copied to the host only if someone reads ``ChunkResult.state``. Stateless chunks (no slot) run
through ``ModelRuntime.run`` in a call of their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from service.engine.device_pool import DevicePool
from service.engine.errors import (
    InferenceFailed,
    NonFiniteOutput,
    QueueFull,
    ServiceError,
    Unavailable,
)
from service.engine.runtime import FloatArray, ModelRuntime, RunOutput
from service.engine.state_pool import SlotArray, SlotPool
from service.engine.stats import BatcherStats

logger = logging.getLogger(__name__)

R = TypeVar("R")
BoolArray = npt.NDArray[np.bool_]
NO_SLOT = -1  # the slot of a stateless row
RECENT_WEIGHT = 0.1  # weight of the newest call in the moving average of call durations


@dataclass(frozen=True)
class ChunkResult:
    """One chunk's outputs ``y`` (T, o); ``state`` (S, L, m) is its state after the last step."""

    y: FloatArray
    batch_states: Callable[[], FloatArray] = field(repr=False)  # (S, L, B, m), copied on use
    row: int = field(repr=False)  # this chunk's index in the batch

    @property
    def state(self) -> FloatArray:
        return np.ascontiguousarray(self.batch_states()[:, :, self.row])  # (S, L, m)


@dataclass(frozen=True)
class BulkResult:
    """A bulk chunk's outputs ``y`` (K, T, o) and ``ok`` (K,).

    A row that is not ok produced NaN or infinity: its session kept its old state, and its row
    of ``y`` means nothing.
    """

    y: FloatArray
    ok: BoolArray
    batch_states: Callable[[], FloatArray] = field(repr=False)  # (S, L, B, m), copied on use
    first_row: int = field(repr=False)  # this chunk's first row in the batch

    def states(self) -> FloatArray:
        """The new states of the chunk's rows (S, L, K, m), copied to the host."""
        rows = slice(self.first_row, self.first_row + len(self.ok))
        return np.ascontiguousarray(self.batch_states()[:, :, rows])


@dataclass(frozen=True)
class BatchOutput:
    """A batch's ``y`` (B, T, o), a function returning its new states (S, L, B, m), and which
    rows are finite (B,)."""

    y: FloatArray
    states: Callable[[], FloatArray]
    ok: BoolArray


class StepFuture(asyncio.Future[R]):
    """The future of a session chunk: cancelling the task that awaits it does not cancel it.

    A cancelled caller keeps waiting until the chunk has run, and only then gets its
    ``CancelledError`` (asyncio raises it at the task's next step). So a caller holding the
    session's lock keeps it until the slot's new state is stored, and the batch never skips a
    chunk whose session has moved on. ``asyncio.shield`` would do the same with two more
    callbacks per step.
    """

    def cancel(self, msg: object = None) -> bool:
        return False


@dataclass(eq=False)
class Chunk:
    """A queued request: ``x`` (T, n) run from a pool slot, or from ``initial_state`` if no slot."""

    x: FloatArray
    slot: int | None
    initial_state: FloatArray | None
    future: asyncio.Future[ChunkResult]
    on_success: Callable[[], None] | None
    enqueued_at: float = field(default=0.0)
    rows: ClassVar[int] = 1  # batch rows it takes (an attribute: read on every step)


@dataclass(eq=False)
class BulkChunk:
    """The chunks of K sessions at once: ``x`` (K, T, n), one pool slot per row (K,).

    ``on_success`` receives the rows that were stored (K,) right after the pool was updated.
    """

    x: FloatArray
    slots: SlotArray
    future: asyncio.Future[BulkResult]
    on_success: Callable[[BoolArray], None] | None
    enqueued_at: float = field(default=0.0)
    rows: int = field(init=False)  # batch rows it takes: one per session

    def __post_init__(self) -> None:
        self.rows = len(self.slots)


Request = Chunk | BulkChunk


@dataclass(frozen=True)
class Assembled:
    """A batch ready to run: ``x`` (R, T, n), ``lengths`` (R,), ``slots`` (R,) with ``NO_SLOT``
    for stateless rows, and ``states``: the states (S, L, r, m) of a piece of rows, on the host
    (None when a device pool keeps them)."""

    x: FloatArray
    lengths: npt.NDArray[np.int64]
    states: Callable[[slice], FloatArray] | None
    slots: npt.NDArray[np.int64]


class Batcher:
    """The batching loop of one model version; start it inside the running event loop."""

    def __init__(
        self,
        runtime: ModelRuntime,
        pool: SlotPool,
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_depth: int,
        workers: int = 1,
        inline_below_s: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.stats = BatcherStats()
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_depth = max_queue_depth
        self._workers = max(1, workers)
        self._inline_below_s = inline_below_s  # calls shorter than this run on the event loop
        self._recent_call_s = 0.0  # moving average of a call's duration
        self._carry: list[Request] = []  # requests pulled but left for the next batch, in order
        self._running: list[Request] = []
        self._queue: deque[Request] = deque()
        self._wakeup: asyncio.Event | None = None  # set when a request is queued
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._carry)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        meta = self.runtime.metadata
        self._task = asyncio.create_task(self._serve(), name=f"batcher {meta.name}/{meta.version}")

    @property
    def busy(self) -> bool:
        """Whether a request is queued or running."""
        return bool(self._queue or self._carry or self._running)

    async def stop(self, reason: str = "service is shutting down") -> None:
        """Stop the loop and fail every request still waiting or running with 503 ``reason``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        error = Unavailable(reason)
        waiting = [*self._running, *self._carry, *self._queue]
        self._queue.clear()
        for chunk in waiting:
            if not chunk.future.done():
                chunk.future.set_exception(error)

    def submit(
        self,
        x: FloatArray,
        *,
        slot: int | None = None,
        initial_state: FloatArray | None = None,
        on_success: Callable[[], None] | None = None,
    ) -> asyncio.Future[ChunkResult]:
        """Queue ``x`` (T, n); raise ``QueueFull`` at once if ``max_queue_depth`` requests wait.

        ``on_success`` runs on the event loop right after the chunk's state is stored. The future
        of a chunk with a ``slot`` is a ``StepFuture``; a stateless chunk's future may be
        cancelled, and the batch then leaves it out if it has not started.
        """
        loop = self._admit()
        future = StepFuture[ChunkResult](loop=loop) if slot is not None else loop.create_future()
        self._enqueue(Chunk(x, slot, initial_state, future, on_success, loop.time()))
        return future

    def submit_bulk(
        self,
        x: FloatArray,
        slots: SlotArray,
        on_success: Callable[[BoolArray], None] | None = None,
    ) -> asyncio.Future[BulkResult]:
        """Queue the chunks ``x`` (K, T, n) of the K sessions in ``slots`` (K, distinct, held by
        the caller) as one request; its future is a ``StepFuture``."""
        loop = self._admit()
        future = StepFuture[BulkResult](loop=loop)
        self._enqueue(BulkChunk(x, slots, future, on_success, loop.time()))
        return future

    def _admit(self) -> asyncio.AbstractEventLoop:
        if self._wakeup is None:
            raise Unavailable("batcher is not running")
        depth = len(self._queue) + len(self._carry)
        if depth >= self._max_queue_depth:
            meta = self.runtime.metadata
            raise QueueFull(meta.name, meta.version, depth)
        return asyncio.get_running_loop()

    def _enqueue(self, request: Request) -> None:
        assert self._wakeup is not None
        self._queue.append(request)
        self._wakeup.set()

    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                self._running = batch
                await self._run(batch)
                self._running = []

    async def _collect(self) -> list[Request]:
        assert self._wakeup is not None
        candidates, self._carry = self._carry, []
        while not candidates and not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._max_delay_s > 0:
            await self._wait_to_fill(sum(chunk.rows for chunk in candidates))
        batch = _Batch(self._max_batch_size)
        for chunk in candidates:
            self._take(chunk, batch)
        queue = self._queue
        while not batch.full and queue:
            self._take(queue.popleft(), batch)
        return batch.requests

    def _take(self, request: Request, batch: _Batch) -> None:
        if request.future.done():
            return  # its caller gave up before it ran
        if batch.admits(request):
            batch.add(request)
        else:
            self._carry.append(request)  # no room, or its session is in the batch: next one

    async def _wait_to_fill(self, rows: int) -> None:
        """Wait until ``rows`` plus the queue's rows fill a batch, or the delay is over."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay_s
        queue, counted = self._queue, 0  # requests only arrive at the right end meanwhile
        while True:
            rows += sum(queue[-k].rows for k in range(1, len(queue) - counted + 1))
            counted = len(queue)
            if rows >= self._max_batch_size:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    async def _run(self, batch: list[Request]) -> None:
        started = asyncio.get_running_loop().time()
        self.stats.queue_delay.add_many([started - chunk.enqueued_at for chunk in batch])
        await self._execute(batch)

    async def _execute(self, batch: list[Request]) -> None:
        """Run a batch; if it fails, run its halves apart so only the failing request fails."""
        loop = asyncio.get_running_loop()
        if isinstance(self.pool, DevicePool) and _mixed(batch):
            await self._execute([c for c in batch if _stateful(c)])
            await self._execute([c for c in batch if not _stateful(c)])
            return
        try:
            out = await self._call(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            middle = len(batch) // 2
            await self._execute(batch[:middle])
            await self._execute(batch[middle:])
            return
        self._resolve(batch, out, loop.time())

    async def _call(self, batch: list[Request]) -> BatchOutput:
        """Run a batch as model calls of at most ``max_batch_size`` rows (a bulk chunk may be
        larger); each call's rows are stored as soon as it succeeds, finite rows only."""
        job = self._assemble(batch)
        pieces = _pieces(len(job.lengths), self._max_batch_size)
        if isinstance(self.pool, DevicePool) and job.states is None:  # gather, run, scatter
            pool = self.pool
            steps = await self._run_pieces(
                lambda p: pool.step(job.x[p], job.lengths[p], job.slots[p]), pieces
            )
            y = _joined([step.y for step in steps], axis=0)
            ok = np.concatenate([step.ok for step in steps])  # the graph stored finite rows only
            return BatchOutput(y, _joined_later([step.states for step in steps]), ok)
        states_of = job.states
        assert states_of is not None  # host pools gather into the batch
        outs = await self._run_pieces(
            lambda p: self.runtime.run(job.x[p], job.lengths[p], states_of(p)), pieces
        )
        oks = [self._store(job.slots[p], out) for p, out in zip(pieces, outs, strict=True)]
        y = _joined([out.y for out in outs], axis=0)  # (B, T, o)
        later = _joined_later([_constant(out.states) for out in outs])  # (S, L, B, m)
        return BatchOutput(y, later, np.concatenate(oks) if len(oks) > 1 else oks[0])

    def _store(self, slots: npt.NDArray[np.int64], out: RunOutput) -> BoolArray:
        """Write one call's finite new states to the pool; return which rows were finite."""
        ok = _finite_rows(out.y, out.states)
        store = ok & (slots != NO_SLOT)
        if store.all():
            self.pool.scatter(slots, out.states)
        elif store.any():
            self.pool.scatter(slots[store], out.states[:, :, store])
        return ok

    async def _run_pieces(self, call: Callable[[slice], R], pieces: list[slice]) -> list[R]:
        """``call`` on each piece of rows, in order of the pieces.

        A single call that recent calls say is short runs right here, on the event loop's
        thread: handing it to a worker thread and back costs tens of microseconds of CPU, more
        than the call itself for a small model. Longer calls, and several pieces, run in the
        executor as at most ``workers`` jobs (one per core), each job running its pieces one
        after the other, so the event loop serves requests meanwhile.
        """
        timed = self._timed(call)
        started = time.perf_counter()
        try:
            if len(pieces) == 1 and self._recent_call_s < self._inline_below_s:
                return [timed(pieces[0])]
            loop = asyncio.get_running_loop()
            if len(pieces) == 1:
                return [await loop.run_in_executor(self._executor, timed, pieces[0])]
            jobs = [pieces[i :: self._workers] for i in range(min(self._workers, len(pieces)))]
            done = await asyncio.gather(
                *(loop.run_in_executor(self._executor, _run_each, timed, job) for job in jobs)
            )
        finally:
            self.stats.batch_run.add(time.perf_counter() - started)
        return [done[i % len(jobs)][i // len(jobs)] for i in range(len(pieces))]  # job i: i::w

    def _timed(self, call: Callable[[slice], R]) -> Callable[[slice], R]:
        """``call``, keeping a moving average of how long one call takes (the call alone, not
        the wait for a worker thread, so that the choice of where to run stays fair)."""

        def timed(piece: slice) -> R:
            started = time.perf_counter()
            try:
                return call(piece)
            finally:
                seconds = time.perf_counter() - started
                self._recent_call_s += RECENT_WEIGHT * (seconds - self._recent_call_s)

        return timed

    def _assemble(self, batch: list[Request]) -> Assembled:
        """Pad the rows into x (R, T, n), and say where each piece's states come from."""
        first = batch[0]
        on_device = isinstance(self.pool, DevicePool) and _stateful(first)
        if len(batch) == 1 and isinstance(first, BulkChunk):  # a mux frame: no copy of x
            k, steps = first.x.shape[:2]
            lengths = np.full(k, steps, np.int64)
            slots = first.slots.astype(np.int64, copy=False)
            pool = self.pool
            # Each piece gathers its own states in the worker: small arrays, no page faults.
            return Assembled(
                first.x, lengths, None if on_device else pool_piece(pool, slots), slots
            )
        meta = self.runtime.metadata
        rows = sum(c.rows for c in batch)
        lengths = np.empty(rows, np.int64)  # (R,)
        slots = np.full(rows, NO_SLOT, np.int64)  # (R,)
        steps = max(c.x.shape[-2] for c in batch)
        x = np.zeros((rows, steps, meta.input_size), np.float32)  # (R, T, n)
        shape = (meta.num_states, meta.num_layers, rows, meta.hidden_size)
        states = None if on_device else np.zeros(shape, np.float32)  # (S, L, R, m)
        row = 0
        for chunk in batch:
            _place(chunk, row, x, lengths, slots, states)
            row += chunk.rows
        if states is None:
            return Assembled(x, lengths, None, slots)
        if (stateful := slots != NO_SLOT).any():
            states[:, :, stateful] = self.pool.gather(slots[stateful])
        return Assembled(x, lengths, lambda piece: states[:, :, piece], slots)

    def _resolve(self, batch: list[Request], out: BatchOutput, now: float) -> None:
        ys = np.ascontiguousarray(out.y)  # (B, T, o): each row's first steps are contiguous
        oks, width, states = out.ok.tolist(), ys.shape[1], out.states
        row = steps_run = 0
        for chunk in batch:  # runs once per step: kept inline
            if isinstance(chunk, BulkChunk):
                steps_run += self._resolve_bulk(chunk, ys, out, row)
            elif not oks[row]:
                meta = self.runtime.metadata
                chunk.future.set_exception(NonFiniteOutput(meta.name, meta.version))
            else:
                if chunk.on_success is not None:
                    chunk.on_success()
                steps = len(chunk.x)
                if not chunk.future.done():
                    y = ys[row] if steps == width else ys[row, :steps]  # (T, o)
                    chunk.future.set_result(ChunkResult(y=y, batch_states=states, row=row))
                steps_run += steps
            row += chunk.rows
        self.stats.record_batch(row, failed=False, steps=steps_run)
        self.stats.step_latency.add_many([now - chunk.enqueued_at for chunk in batch])

    def _resolve_bulk(self, chunk: BulkChunk, ys: FloatArray, out: BatchOutput, row: int) -> int:
        k, steps = (int(d) for d in chunk.x.shape[:2])
        ok = out.ok[row : row + k]
        if chunk.on_success is not None:
            chunk.on_success(ok)
        y = ys[row : row + k, :steps]  # (K, T, o)
        chunk.future.set_result(BulkResult(y=y, ok=ok, batch_states=out.states, first_row=row))
        return int(np.count_nonzero(ok)) * steps

    def _fail(self, batch: list[Request], exc: Exception) -> None:
        meta = self.runtime.metadata
        self.stats.record_batch(sum(c.rows for c in batch), failed=True)
        logger.error("chunk failed on %s/%s: %s", meta.name, meta.version, exc)
        error = exc
        if not isinstance(exc, ServiceError):
            error = InferenceFailed(meta.name, meta.version, str(exc))
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_exception(error)


class _Batch:
    """The requests of a batch being collected, its row count and its session slots."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.requests: list[Request] = []
        self.rows = 0
        self._slots: set[int] = set()

    @property
    def full(self) -> bool:
        return self.rows >= self.max_rows

    def admits(self, request: Request) -> bool:
        if not self.requests:
            return True  # a bulk chunk larger than the limit runs alone
        if self.rows + request.rows > self.max_rows:
            return False
        return not (isinstance(request, Chunk) and request.slot in self._slots)

    def add(self, request: Request) -> None:
        self.requests.append(request)
        self.rows += request.rows
        if isinstance(request, Chunk) and request.slot is not None:
            self._slots.add(request.slot)


def _place(
    chunk: Request,
    row: int,
    x: FloatArray,
    lengths: npt.NDArray[np.int64],
    slots: npt.NDArray[np.int64],
    states: FloatArray | None,
) -> None:
    """Write one request's rows into the batch arrays, starting at ``row``."""
    if isinstance(chunk, BulkChunk):
        k, steps = chunk.x.shape[:2]
        x[row : row + k, :steps] = chunk.x
        lengths[row : row + k] = steps
        slots[row : row + k] = chunk.slots
        return
    x[row, : len(chunk.x)] = chunk.x
    lengths[row] = len(chunk.x)
    if chunk.slot is not None:
        slots[row] = chunk.slot
    elif chunk.initial_state is not None and states is not None:
        states[:, :, row] = chunk.initial_state


def _constant(states: FloatArray) -> Callable[[], FloatArray]:
    return lambda: states


def pool_piece(pool: SlotPool, slots: npt.NDArray[np.int64]) -> Callable[[slice], FloatArray]:
    """The states of a piece of ``slots``, gathered from the pool when the piece runs."""
    return lambda piece: pool.gather(slots[piece])


def _run_each(call: Callable[[slice], R], pieces: list[slice]) -> list[R]:
    """Run ``call`` on each piece in turn (in a worker thread)."""
    return [call(piece) for piece in pieces]


def _pieces(rows: int, size: int) -> list[slice]:
    """Consecutive row ranges of at most ``size`` rows covering ``rows`` rows."""
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _joined(arrays: list[FloatArray], axis: int) -> FloatArray:
    """The pieces' arrays as one, without a copy when there is one piece."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)


def _joined_later(fetches: list[Callable[[], FloatArray]]) -> Callable[[], FloatArray]:
    """A function returning the pieces' new states (S, L, B, m), fetched and joined on use."""
    return lambda: _joined([fetch() for fetch in fetches], axis=2)


def _finite_rows(y: FloatArray, states: FloatArray | None = None) -> BoolArray:
    """Which rows of a batch have finite outputs ``y`` (B, T, o) and new ``states`` (S, L, B, m)."""
    if np.isfinite(y).all() and (states is None or np.isfinite(states).all()):
        return np.ones(len(y), np.bool_)  # the common case: one pass over each array
    ok = np.asarray(np.isfinite(y).all(axis=(1, 2)))
    if states is not None:
        ok &= np.isfinite(states).all(axis=(0, 1, 3))
    return ok


def _stateful(request: Request) -> bool:
    return isinstance(request, BulkChunk) or request.slot is not None


def _mixed(batch: list[Request]) -> bool:
    """Whether a batch holds both session chunks (with a slot) and stateless ones."""
    with_slot = sum(_stateful(c) for c in batch)
    return 0 < with_slot < len(batch)
