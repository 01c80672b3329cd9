"""Redis answering late or not at all: the service says "applied", "not applied" or "unknown",
and never the wrong one (a proxy between the service and a real Redis injects the faults)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from fault_proxy import FaultProxy

from service.engine.store import codec

if TYPE_CHECKING:
    from conftest import RedisServer, ServiceProcess, TinyGRU

A = [[0.5, -1.0], [1.5, 0.25]]
B = [[0.1, 0.2]]
SAVE = b"HSET"  # only the compare-and-set write script contains it


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(redis_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def service(start_service: Callable[..., ServiceProcess], proxy: FaultProxy) -> ServiceProcess:
    return start_service(redis_url=f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_s=0.3)


def _session(service: ServiceProcess) -> str:
    with service.client() as http:
        created = http.post("/v1/sessions", json={"model": "tiny"})
        session_id: str = created.json()["session_id"]
        assert http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": A}).status_code == 200
    return session_id


def _step(service: ServiceProcess, session_id: str, **body: Any) -> Any:
    with service.client() as http:
        return http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": B, **body})


def _stored_steps(redis_server: RedisServer, session_id: str) -> int:
    blob = redis_server.client().hget(f"rnnserve:session:{session_id}", "blob")
    return codec.decode(blob).step_count


def test_a_late_reply_to_an_applied_write_answers_the_step(
    service: ServiceProcess, proxy: FaultProxy, redis_server: RedisServer, tiny: TinyGRU
) -> None:
    session_id = _session(service)
    proxy.hold_replies_to(SAVE, 0.8)  # applied at once, its reply after the 0.3 s timeout
    answer = _step(service, session_id)
    assert proxy.held == 1
    assert answer.status_code == 200, answer.text
    assert answer.json()["step_count"] == 3 and _stored_steps(redis_server, session_id) == 3
    np.testing.assert_allclose(answer.json()["outputs"], tiny.run(A + B)[0][2:], atol=1e-5)
    assert _step(service, session_id).json()["step_count"] == 4  # applied once, not twice


def test_a_write_that_never_arrived_is_reported_unchanged(
    service: ServiceProcess, proxy: FaultProxy, redis_server: RedisServer, tiny: TinyGRU
) -> None:
    session_id = _session(service)
    proxy.swallow_requests_with(SAVE)
    answer = _step(service, session_id, expected_step_count=2)
    assert proxy.swallowed == 1
    assert answer.status_code == 503 and "the session is unchanged" in answer.json()["error"]
    assert _stored_steps(redis_server, session_id) == 2
    retry = _step(service, session_id, expected_step_count=2)
    assert retry.status_code == 200 and retry.json()["step_count"] == 3
    np.testing.assert_allclose(retry.json()["outputs"], tiny.run(A + B)[0][2:], atol=1e-5)


def test_an_unconfirmed_write_is_reported_unknown_and_a_retry_is_safe(
    service: ServiceProcess, proxy: FaultProxy, redis_server: RedisServer
) -> None:
    session_id = _session(service)
    proxy.pause_after(SAVE, 1.5)  # the write arrives; its reply and the read-back do not
    answer = _step(service, session_id, expected_step_count=2)
    assert answer.status_code == 503, answer.text
    assert "may or may not have been applied" in answer.json()["error"]
    assert answer.json()["step_count"] == 2
    time.sleep(1.5)  # Redis gets the write late and applies it
    assert _stored_steps(redis_server, session_id) == 3
    retry = _step(service, session_id, expected_step_count=2)
    assert retry.status_code == 409 and retry.json()["step_count"] == 3  # not applied twice
