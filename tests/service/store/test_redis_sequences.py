"""V2 sequences in the Redis store: any replica continues any sequence, with tritonclient."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.http as triton

if TYPE_CHECKING:
    from conftest import RedisServer, ServiceProcess, TinyGRU


def _infer(url: str, x: np.ndarray, sequence_id: int | str, **flags: bool) -> np.ndarray:
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=10.0)
    try:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("tiny", [tensor], sequence_id=sequence_id, **flags)
        y: np.ndarray = result.as_numpy("y")
        return y
    finally:
        client.close()


def test_a_sequence_continues_on_any_replica(
    start_service: Callable[..., ServiceProcess], redis_server: RedisServer, tiny: TinyGRU
) -> None:
    first, second = start_service(count=2)
    chunks = np.random.default_rng(5).normal(size=(4, 1, 2, 2)).astype(np.float32)
    outputs = [
        _infer(first.url, chunks[0], "sensor-7", sequence_start=True),
        _infer(second.url, chunks[1], "sensor-7"),  # the other replica knows the sequence
        _infer(first.url, chunks[2], "sensor-7"),
    ]
    keys = redis_server.client().keys("rnnserve:sequence:*")
    assert len(keys) == 1 and keys[0].endswith(b":tiny:s:sensor-7")
    outputs.append(_infer(second.url, chunks[3], "sensor-7", sequence_end=True))
    assert redis_server.client().keys("rnnserve:sequence:*") == []
    expected = tiny.run(chunks.reshape(-1, 2))[0]
    np.testing.assert_allclose(np.concatenate(outputs, axis=1)[0], expected, atol=1e-5)


def test_a_sequence_entry_expires_with_its_session(
    start_service: Callable[..., ServiceProcess], redis_server: RedisServer
) -> None:
    service = start_service(idle_ttl_s=600)
    _infer(service.url, np.zeros((1, 1, 2), np.float32), 12, sequence_start=True)
    (key,) = redis_server.client().keys("rnnserve:sequence:*")
    session_keys = redis_server.client().keys("rnnserve:session:*")
    assert 0 < redis_server.client().pttl(key) <= 600_000
    assert abs(redis_server.client().pttl(key) - redis_server.client().pttl(session_keys[0])) < 5000
