"""The mux stream with the Redis store: every stepped entry is stored before the reply, and any
replica continues the sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.client.mux import MuxClient
from service.engine.groups import EntryStatus
from service.engine.store import codec

if TYPE_CHECKING:
    from conftest import RedisServer, ServiceProcess, TinyGRU


async def test_mux_steps_are_stored_and_continue_on_another_replica(
    start_service: Callable[..., ServiceProcess], redis_server: RedisServer, tiny: TinyGRU
) -> None:
    first, second = start_service(count=2)
    rng = np.random.default_rng(4)
    frames = rng.normal(size=(3, 4, 1, 2)).astype(np.float32)  # (frames, K, T, n)
    async with await MuxClient.connect(first.url) as mux:
        opened = await mux.open("tiny", count=4)
        for inputs in frames[:2]:
            reply = await mux.step(opened.handles, inputs)
            assert reply.status.tolist() == [EntryStatus.OK] * 4
    for k, session_id in enumerate(opened.session_ids):
        blob = redis_server.client().hget(f"rnnserve:session:{session_id}", "blob")
        assert blob is not None
        record = codec.decode(blob)
        assert record.step_count == 2
        _, state = tiny.run(frames[:2, k, 0])
        np.testing.assert_allclose(record.state[0], state, atol=1e-5)
    async with await MuxClient.connect(second.url) as mux:  # another replica picks them up
        attached = await mux.attach(opened.session_ids)
        assert attached.step_counts == [2] * 4
        reply = await mux.step(attached.handles, frames[2], [2] * 4)
        assert reply.step_counts.tolist() == [3] * 4
        for k in range(4):
            expected = tiny.run(frames[:, k, 0])[0][-1:]
            np.testing.assert_allclose(reply.outputs[k], expected, atol=1e-5)
