"""Dynamic batching across sessions: one ONNX Runtime call runs chunks of many sessions at once.

Chunks wait on a queue, each with its own future (a session chunk's future cannot be cancelled,
see ``StepFuture``). A batch closes when it holds ``max_batch_size``
chunks or ``max_delay_s`` after its first chunk (0: whatever is queued when the previous batch
ends). A batch holds at most one chunk per state slot, so a session's chunks run in order. Chunks of
different lengths are padded to the longest and run with ``lengths``. The states of a batch are
gathered from the pool before the call and scattered back only if the call succeeded. A failed call
is retried in halves, so exactly the failing chunk fails (with a clear error) and every failed
chunk's state stays as it was.

With a ``DevicePool`` the states of session chunks never reach the host: the pool runs gather,
model and scatter as one call on the device (``DevicePool.step``), and a chunk's new state is
copied to the host only if someone reads ``ChunkResult.state``. Stateless chunks (no slot) run
through ``ModelRuntime.run`` in a call of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.engine.device_pool import DevicePool
from service.engine.errors import InferenceFailed, QueueFull, ServiceError, Unavailable
from service.engine.runtime import FloatArray, ModelRuntime
from service.engine.state_pool import SlotPool
from service.engine.stats import BatcherStats

logger = logging.getLogger(__name__)


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
class BatchOutput:
    """A batch's ``y`` (B, T, o) and a function returning its new states (S, L, B, m)."""

    y: FloatArray
    states: Callable[[], FloatArray]


class StepFuture(asyncio.Future[ChunkResult]):
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
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.stats = BatcherStats()
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_depth = max_queue_depth
        self._carry: list[Chunk] = []  # chunks pulled but left for the next batch, in order
        self._running: list[Chunk] = []
        self._queue: deque[Chunk] = deque()
        self._wakeup: asyncio.Event | None = None  # set when a chunk is queued
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
        """Whether a chunk is queued or running."""
        return bool(self._queue or self._carry or self._running)

    async def stop(self, reason: str = "service is shutting down") -> None:
        """Stop the loop and fail every chunk still waiting or running with 503 ``reason``."""
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
        """Queue ``x`` (T, n); raise ``QueueFull`` at once if ``max_queue_depth`` chunks wait.

        ``on_success`` runs on the event loop right after the chunk's state is stored. The future
        of a chunk with a ``slot`` is a ``StepFuture``; a stateless chunk's future may be
        cancelled, and the batch then leaves it out if it has not started.
        """
        if self._wakeup is None:
            raise Unavailable("batcher is not running")
        depth = len(self._queue) + len(self._carry)
        if depth >= self._max_queue_depth:
            meta = self.runtime.metadata
            raise QueueFull(meta.name, meta.version, depth)
        loop = asyncio.get_running_loop()
        future = StepFuture(loop=loop) if slot is not None else loop.create_future()
        chunk = Chunk(x, slot, initial_state, future, on_success, loop.time())
        self._queue.append(chunk)
        self._wakeup.set()
        return future

    async def _serve(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                self._running = batch
                await self._run(batch)
                self._running = []

    async def _collect(self) -> list[Chunk]:
        assert self._wakeup is not None
        candidates, self._carry = self._carry, []
        while not candidates and not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._max_delay_s > 0:
            await self._wait_to_fill(len(candidates))
        batch: list[Chunk] = []
        slots: set[int] = set()
        for chunk in candidates:
            self._take(chunk, batch, slots)
        queue = self._queue
        while len(batch) < self._max_batch_size and queue:
            self._take(queue.popleft(), batch, slots)
        return batch

    def _take(self, chunk: Chunk, batch: list[Chunk], slots: set[int]) -> None:
        if chunk.future.done():
            return  # its caller gave up before it ran
        if len(batch) >= self._max_batch_size or chunk.slot in slots:
            self._carry.append(chunk)  # one chunk per session and batch: this one goes next
            return
        if chunk.slot is not None:
            slots.add(chunk.slot)
        batch.append(chunk)

    async def _wait_to_fill(self, have: int) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_delay_s
        while have + len(self._queue) < self._max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    async def _run(self, batch: list[Chunk]) -> None:
        started = asyncio.get_running_loop().time()
        self.stats.queue_delay.add_many([started - chunk.enqueued_at for chunk in batch])
        await self._execute(batch)

    async def _execute(self, batch: list[Chunk]) -> None:
        """Run a batch; if it fails, run its halves apart so only the failing chunk fails."""
        loop = asyncio.get_running_loop()
        if isinstance(self.pool, DevicePool) and _mixed(batch):
            await self._execute([c for c in batch if c.slot is not None])
            await self._execute([c for c in batch if c.slot is None])
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

    async def _call(self, batch: list[Chunk]) -> BatchOutput:
        """One ONNX Runtime call; the new states are stored only if it succeeds."""
        loop = asyncio.get_running_loop()
        x, lengths, states, rows, slots = self._assemble(batch)
        if isinstance(self.pool, DevicePool) and slots.size:
            step = await loop.run_in_executor(self._executor, self.pool.step, x, lengths, slots)
            return BatchOutput(step.y, step.states)  # the pool is already updated
        out = await loop.run_in_executor(self._executor, self.runtime.run, x, lengths, states)
        if slots.size:
            self.pool.scatter(slots, out.states[:, :, rows])
        return BatchOutput(out.y, lambda: out.states)

    def _assemble(
        self, batch: list[Chunk]
    ) -> tuple[FloatArray, np.ndarray, FloatArray, np.ndarray, np.ndarray]:
        """Pad the chunks into x (B, T, n) and gather their states (S, L, B, m)."""
        meta = self.runtime.metadata
        lengths = np.array([len(c.x) for c in batch], dtype=np.int64)  # (B,)
        x = np.zeros((len(batch), int(lengths.max()), meta.input_size), np.float32)  # (B, T, n)
        shape = (meta.num_states, meta.num_layers, len(batch), meta.hidden_size)
        states = np.zeros(shape, np.float32)  # (S, L, B, m)
        for i, chunk in enumerate(batch):
            x[i, : len(chunk.x)] = chunk.x
            if chunk.initial_state is not None:
                states[:, :, i] = chunk.initial_state
        rows = np.array([i for i, c in enumerate(batch) if c.slot is not None], dtype=np.intp)
        slots = np.array([c.slot for c in batch if c.slot is not None], dtype=np.intp)
        if slots.size and not isinstance(self.pool, DevicePool):
            states[:, :, rows] = self.pool.gather(slots)
        return x, lengths, states, rows, slots

    def _resolve(self, batch: list[Chunk], out: BatchOutput, now: float) -> None:
        self.stats.record_batch(len(batch), failed=False, steps=sum(len(c.x) for c in batch))
        self.stats.step_latency.add_many([now - chunk.enqueued_at for chunk in batch])
        ys = np.ascontiguousarray(out.y)  # (B, T, o): each row's first steps are contiguous
        steps = ys.shape[1]
        for i, chunk in enumerate(batch):
            if chunk.on_success is not None:
                chunk.on_success()
            if not chunk.future.done():
                y = ys[i] if len(chunk.x) == steps else ys[i, : len(chunk.x)]  # (T, o)
                chunk.future.set_result(ChunkResult(y=y, batch_states=out.states, row=i))

    def _fail(self, batch: list[Chunk], exc: Exception) -> None:
        meta = self.runtime.metadata
        self.stats.record_batch(len(batch), failed=True)
        logger.error("chunk failed on %s/%s: %s", meta.name, meta.version, exc)
        error = exc
        if not isinstance(exc, ServiceError):
            error = InferenceFailed(meta.name, meta.version, str(exc))
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_exception(error)


def _mixed(batch: list[Chunk]) -> bool:
    """Whether a batch holds both session chunks (with a slot) and stateless ones."""
    with_slot = sum(c.slot is not None for c in batch)
    return 0 < with_slot < len(batch)
