"""The Redis store in process: record format, per-batch pipelining, TTL, clear errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from service.app import create_app
from service.engine.dataplane import DataPlane
from service.engine.store import SessionRecord, codec
from service.engine.store.errors import CorruptRecord
from service.settings import Settings

if TYPE_CHECKING:
    from conftest import RedisServer, TinyGRU
    from fastapi.testclient import TestClient


def redis_settings(redis_server: RedisServer, **overrides: Any) -> dict[str, Any]:
    return {"session_store": "redis", "redis_url": redis_server.url, **overrides}


def test_record_is_a_small_header_and_raw_float32() -> None:
    state = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (S, L, m)
    record = SessionRecord("abc", "m", 3, 17, 5, "owner-tag", 1.5, state)
    blob = codec.encode(record)
    assert blob.startswith(b"RNS1")
    assert blob.endswith(state.tobytes())
    assert len(blob) - state.nbytes < 256
    back = codec.decode(blob)
    assert (back.session_id, back.model, back.version, back.step_count, back.revision) == (
        "abc",
        "m",
        3,
        17,
        5,
    )
    assert back.owner_hash == "owner-tag"
    np.testing.assert_array_equal(back.state, state)
    with pytest.raises(CorruptRecord, match="not a session record"):
        codec.decode(b"JUNK" + blob[4:])


async def test_steps_of_one_batch_share_one_pipeline(
    models_dir: Path, redis_server: RedisServer, tiny: TinyGRU
) -> None:
    settings = Settings(
        models_dir=models_dir,
        providers=["CPUExecutionProvider"],
        **redis_settings(redis_server),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        dataplane: DataPlane = app.state.dataplane
        async with asyncio.timeout(20):
            while not dataplane.ready:
                await asyncio.sleep(0.01)
        ids = [(await dataplane.create_session("tiny", None, None)).session_id for _ in range(16)]
        store, model = dataplane.store, dataplane.model("tiny")
        assert store is not None
        pipelines, commands = store.stats.pipelines, store.stats.commands
        batches = model.batcher.stats.batches
        x = [[0.1 * i, -0.2] for i in range(3)]
        results = await asyncio.gather(*(dataplane.step(i, x, None) for i in ids))
        assert model.batcher.stats.batches - batches == 1
        assert store.stats.commands - commands == 32  # a revision check and a write per step
        assert store.stats.pipelines - pipelines == 2  # ... in one round trip each
        expected, _ = tiny.run(np.array(x))
        for result in results:
            np.testing.assert_allclose(result.outputs, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("idle_ttl_s", "low", "high"),
    [pytest.param(30, 1, 30_000, id="ttl"), pytest.param(0, -1, -1, id="no-ttl")],
)
def test_idle_ttl_is_a_redis_key_expiry(
    make_client: Callable[..., TestClient],
    redis_server: RedisServer,
    idle_ttl_s: float,
    low: int,
    high: int,
) -> None:
    client = make_client(**redis_settings(redis_server, idle_ttl_s=idle_ttl_s))
    session_id = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    assert client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[1, 2]]}).is_success
    ttl_ms = redis_server.client().pttl(f"rnnserve:session:{session_id}")
    assert low <= ttl_ms <= high


def test_a_session_on_an_unloaded_version_gets_a_clear_error(
    make_client: Callable[..., TestClient],
    redis_server: RedisServer,
    tmp_path: Path,
    add_model: Callable[..., Path],
    tiny: TinyGRU,
) -> None:
    old = make_client(**redis_settings(redis_server))
    created = old.post("/v1/sessions", json={"model": "tiny", "version": 1}).json()
    only_v2 = tmp_path / "models"
    add_model(only_v2, "tiny", 2, tiny)
    new = make_client(models_dir=only_v2, **redis_settings(redis_server))
    response = new.post(f"/v1/sessions/{created['session_id']}/steps", json={"inputs": [[1, 2]]})
    assert response.status_code == 404
    assert "version 1, which is not loaded here" in response.json()["error"]
    assert "served versions of 'tiny': 2" in response.json()["error"]


def test_sessions_stay_private_to_their_key_across_replicas(
    make_client: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    settings = redis_settings(redis_server, api_keys=["key-a", "key-b"])
    a, b = make_client(**settings), make_client(**settings)
    key_a, key_b = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    created = a.post("/v1/sessions", json={"model": "tiny"}, headers=key_a).json()
    path = f"/v1/sessions/{created['session_id']}"
    assert b.get(path, headers=key_b).status_code == 404
    assert b.get(path, headers=key_a).json()["step_count"] == 0
    blob = redis_server.client().hget(f"rnnserve:session:{created['session_id']}", "blob")
    assert blob is not None and b"key-a" not in blob  # only a hash of the key is stored


def test_delete_on_one_replica_ends_the_session_everywhere(
    make_client: Callable[..., TestClient], redis_server: RedisServer
) -> None:
    a, b = make_client(**redis_settings(redis_server)), make_client(**redis_settings(redis_server))
    session_id = a.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    assert b.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[1, 2]]}).is_success
    assert a.delete(f"/v1/sessions/{session_id}").status_code == 204
    response = b.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[1, 2]]})
    assert response.status_code == 404
    assert "not found" in response.json()["error"]
