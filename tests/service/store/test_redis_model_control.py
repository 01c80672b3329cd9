"""Unloading a model version with the Redis session store: its sessions stay in Redis (another
replica may serve that version) and come back here when the version is loaded again."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from conftest import RedisServer, ServiceProcess, TinyGRU


@pytest.fixture
def models_dir(own_models_dir: Path) -> Path:
    """The service processes serve a folder of this test's own, which it changes."""
    return own_models_dir


def test_an_unloaded_version_keeps_its_sessions_in_redis(
    start_service: Callable[..., ServiceProcess],
    redis_server: RedisServer,
    models_dir: Path,
    tiny_v1: TinyGRU,
    add_model: Callable[..., Path],
) -> None:
    service = start_service(model_control_mode="explicit")
    data = np.random.default_rng(7).normal(0, 1, (5, 2)).round(3).tolist()
    with service.client() as http:
        created = http.post("/v1/sessions", json={"model": "tiny", "version": 1})
        session_id = created.json()["session_id"]
        assert http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": data[:3]}).is_success
        shutil.rmtree(models_dir / "tiny" / "1")
        assert http.post("/v2/repository/models/tiny/load").status_code == 200
        gone = http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": data[3:]})
        stored = redis_server.client().exists(f"rnnserve:session:{session_id}")
        add_model(models_dir, "tiny", 1, tiny_v1)
        assert http.post("/v2/repository/models/tiny/load").status_code == 200
        back = http.post(f"/v1/sessions/{session_id}/steps", json={"inputs": data[3:]})
    assert gone.status_code == 404
    assert gone.json()["error"] == (
        f"session {session_id!r} runs on model 'tiny' version 1, which is not loaded here "
        "(served versions of 'tiny': 2); create a new session"
    )
    assert stored
    assert back.status_code == 200 and back.json()["step_count"] == 5
    expected, _ = tiny_v1.run(np.array(data))
    np.testing.assert_allclose(back.json()["outputs"], expected[3:], atol=1e-5)
