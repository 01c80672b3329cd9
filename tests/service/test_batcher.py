from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from service.engine.batcher import Batcher, ChunkResult
from service.engine.errors import InferenceFailed, QueueFull, Unavailable
from service.engine.registry import read_model_dir
from service.engine.runtime import FloatArray, ModelRuntime, RunOutput
from service.engine.state_pool import StatePool

if TYPE_CHECKING:
    from conftest import TinyGRU

FEATURES = 2  # input size of the tiny models
POISON = 999.0  # FailingRuntime fails any call whose inputs contain this value


class FailingRuntime(ModelRuntime):
    """Fails calls with ``POISON`` in their inputs; records the thread of every call, and
    sleeps ``delay_s`` in each."""

    threads: list[str]
    delay_s = 0.0

    def run(self, x: FloatArray, lengths: np.ndarray, states: FloatArray, *_: object) -> RunOutput:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay_s)
        if (x == POISON).any():
            raise RuntimeError("poisoned input")
        return super().run(x, lengths, states)


BatcherFactory = Callable[..., Batcher]


@pytest.fixture
async def make_batcher(models_dir: Path) -> AsyncIterator[BatcherFactory]:
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="worker")
    batchers: list[Batcher] = []
    spec = read_model_dir(models_dir / "tiny" / "2")

    def build(
        max_batch_size: int = 64,
        max_delay_s: float = 0.0,
        max_queue_depth: int = 1000,
        inline_below_s: float = 0.0,
    ) -> Batcher:
        runtime = FailingRuntime(spec, ["CPUExecutionProvider"])
        runtime.threads = []
        meta = spec.metadata
        pool = StatePool(meta.num_states, meta.num_layers, meta.hidden_size, max_slots=1000)
        batcher = Batcher(
            runtime,
            pool,
            executor,
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            max_queue_depth=max_queue_depth,
            inline_below_s=inline_below_s,
        )
        batcher.start()
        batchers.append(batcher)
        return batcher

    yield build
    for batcher in batchers:
        await batcher.stop()
    executor.shutdown()


def random_chunks(rng: np.random.Generator, total: int) -> list[np.ndarray]:
    x = rng.normal(size=(total, FEATURES)).astype(np.float32)
    cuts = np.sort(rng.choice(np.arange(1, total), size=rng.integers(1, 6), replace=False))
    return np.split(x, cuts)


async def stream(batcher: Batcher, slot: int, chunks: list[np.ndarray]) -> np.ndarray:
    outputs = [(await batcher.submit(chunk, slot=slot)).y for chunk in chunks]
    return np.concatenate(outputs)


async def test_batched_streams_equal_the_reference(
    make_batcher: BatcherFactory, tiny: TinyGRU
) -> None:
    batcher = make_batcher(max_batch_size=16)
    rng = np.random.default_rng(0)
    sessions = [random_chunks(rng, int(rng.integers(8, 30))) for _ in range(40)]
    slots = [batcher.pool.acquire() for _ in sessions]
    results = await asyncio.gather(
        *(stream(batcher, s, c) for s, c in zip(slots, sessions, strict=True))
    )
    for chunks, y in zip(sessions, results, strict=True):
        expected, _ = tiny.run(np.concatenate(chunks))
        np.testing.assert_allclose(y, expected, atol=1e-5)
    assert batcher.stats.max_batch_size > 1  # the chunks really shared calls
    assert batcher.stats.chunks == sum(len(c) for c in sessions)


async def test_chunks_of_one_session_run_in_order_one_per_batch(
    make_batcher: BatcherFactory, tiny: TinyGRU
) -> None:
    batcher = make_batcher()
    slot = batcher.pool.acquire()
    chunks = random_chunks(np.random.default_rng(1), 20)
    futures = [batcher.submit(chunk, slot=slot) for chunk in chunks]  # all queued at once
    outputs = [(await f).y for f in futures]
    expected, _ = tiny.run(np.concatenate(chunks))
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=1e-5)
    assert batcher.stats.batches == len(chunks)


async def test_stateless_rows_share_a_batch_with_session_rows(
    make_batcher: BatcherFactory, tiny: TinyGRU
) -> None:
    batcher = make_batcher()
    rng = np.random.default_rng(2)
    start = rng.normal(size=(1, 2, 8)).astype(np.float32)  # (S, L, m)
    x_free, x_slot = rng.normal(size=(5, 2)), rng.normal(size=(3, 2))
    slot = batcher.pool.acquire()
    free = batcher.submit(x_free.astype(np.float32), initial_state=start)
    bound = batcher.submit(x_slot.astype(np.float32), slot=slot)
    free_result, bound_result = await free, await bound
    y, h = tiny.run(x_free, start[0])
    np.testing.assert_allclose(free_result.y, y, atol=1e-5)
    np.testing.assert_allclose(free_result.state[0], h, atol=1e-5)
    np.testing.assert_allclose(bound_result.y, tiny.run(x_slot)[0], atol=1e-5)
    assert batcher.stats.batches == 1


async def test_a_failing_chunk_does_not_fail_its_batch_mates(
    make_batcher: BatcherFactory, tiny: TinyGRU
) -> None:

    batcher = make_batcher()
    rng = np.random.default_rng(3)
    slots = [batcher.pool.acquire() for _ in range(5)]
    warmup = [rng.normal(size=(2, 2)).astype(np.float32) for _ in slots]
    await asyncio.gather(*(batcher.submit(x, slot=s) for x, s in zip(warmup, slots, strict=True)))
    before = batcher.pool.gather(np.array(slots))
    chunks = [rng.normal(size=(3, 2)).astype(np.float32) for _ in slots]
    chunks[2][1, 0] = POISON
    results = await asyncio.gather(
        *(batcher.submit(x, slot=s) for x, s in zip(chunks, slots, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(results[2], InferenceFailed)
    assert "poisoned input" in results[2].message and "'tiny' version 2" in results[2].message
    np.testing.assert_array_equal(batcher.pool.gather(np.array([slots[2]])), before[:, :, [2]])
    for i in (0, 1, 3, 4):
        expected, _ = tiny.run(np.concatenate([warmup[i], chunks[i]]))
        np.testing.assert_allclose(results[i].y, expected[2:], atol=1e-5)


async def test_full_queue_rejects_at_once(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_batch_size=2, max_queue_depth=3)
    x = np.zeros((1, 2), np.float32)
    futures = [batcher.submit(x) for _ in range(3)]  # the loop has not run yet: all queued
    with pytest.raises(QueueFull, match="overloaded: 3 chunks already queued") as info:
        batcher.submit(x)
    assert info.value.status_code == 503 and info.value.headers == {"Retry-After": "1"}
    await asyncio.gather(*futures)
    await batcher.submit(x)  # room again


async def test_batch_waits_up_to_the_delay_to_fill(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_batch_size=4, max_delay_s=5.0)
    x = np.zeros((1, 2), np.float32)
    first = batcher.submit(x)
    await asyncio.sleep(0.02)
    rest = [batcher.submit(x) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=2.0)  # closed on size, not time
    assert batcher.stats.batches == 1 and batcher.stats.max_batch_size == 4


async def test_rows_not_requests_fill_a_batch_before_the_delay(
    make_batcher: BatcherFactory,
) -> None:
    """A bulk request of as many rows as a batch holds runs at once, not after the delay."""
    batcher = make_batcher(max_batch_size=4, max_delay_s=30.0)
    slots = np.array([batcher.pool.acquire() for _ in range(4)])
    bulk = batcher.submit_bulk(np.zeros((4, 1, 2), np.float32), slots)
    done, _ = await asyncio.wait([bulk], timeout=5.0)  # a StepFuture cannot be cancelled
    assert done, "the full bulk request waited for the batch delay"
    assert batcher.stats.batches == 1 and batcher.stats.max_batch_size == 4


async def test_zero_delay_runs_without_waiting_for_more(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_batch_size=64, max_delay_s=0.0)
    await asyncio.wait_for(batcher.submit(np.zeros((1, 2), np.float32)), timeout=2.0)
    assert batcher.stats.batches == 1


async def test_stop_fails_waiting_chunks(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher()
    future = batcher.submit(np.zeros((1, 2), np.float32))
    await batcher.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        await future


async def test_a_cancelled_caller_waits_until_its_session_chunk_has_run(
    make_batcher: BatcherFactory, tiny: TinyGRU
) -> None:
    batcher = make_batcher(max_batch_size=8, max_delay_s=0.3)  # the chunk waits in the queue
    slot = batcher.pool.acquire()
    x = np.ones((2, 2), np.float32)
    caller = asyncio.create_task(_await(batcher.submit(x, slot=slot)))
    await asyncio.sleep(0.02)
    caller.cancel()
    await asyncio.sleep(0.02)
    assert not caller.done()  # still queued: the caller (and any lock it holds) waits for it
    await asyncio.wait([caller], timeout=2.0)
    assert caller.cancelled()
    _, expected = tiny.run(x)  # the chunk ran and its state is stored
    np.testing.assert_allclose(batcher.pool.gather(np.array([slot]))[0, :, 0], expected, atol=1e-5)


async def test_a_cancelled_stateless_chunk_is_left_out(make_batcher: BatcherFactory) -> None:
    batcher = make_batcher(max_batch_size=8, max_delay_s=0.1)
    x = np.zeros((1, 2), np.float32)
    dropped, kept = batcher.submit(x), batcher.submit(x)
    dropped.cancel()
    await asyncio.wait_for(kept, timeout=2.0)
    assert batcher.stats.chunks == 1


async def _await(future: asyncio.Future[ChunkResult]) -> ChunkResult:
    return await future


async def test_short_calls_run_on_the_event_loop_and_long_ones_in_a_worker(
    make_batcher: BatcherFactory,
) -> None:
    batcher = make_batcher(inline_below_s=0.001)
    runtime = batcher.runtime
    assert isinstance(runtime, FailingRuntime)
    pool = batcher.pool
    slot = pool.acquire()
    x = np.ones((1, FEATURES), np.float32)
    await batcher.submit(x, slot=slot)
    assert runtime.threads == [threading.current_thread().name]  # quick: right here
    runtime.delay_s = 0.01  # calls now take 10 ms, ten times the limit
    for _ in range(20):
        await batcher.submit(x, slot=slot)
    assert runtime.threads[-1].startswith("worker")  # the loop serves requests meanwhile
    assert runtime.threads.count(threading.current_thread().name) < 10


async def test_with_no_inline_limit_every_call_runs_in_a_worker(
    make_batcher: BatcherFactory,
) -> None:
    batcher = make_batcher(inline_below_s=0.0)
    runtime = batcher.runtime
    assert isinstance(runtime, FailingRuntime)
    slot = batcher.pool.acquire()
    for _ in range(3):
        await batcher.submit(np.ones((1, FEATURES), np.float32), slot=slot)
    assert all(name.startswith("worker") for name in runtime.threads)
