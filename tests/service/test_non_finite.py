"""Outputs that overflow: a clear error, and the session's state and step count untouched.

The shipped CO2 forecaster turns a state of 3e38 into NaN, so these tests serve it beside the
tiny test model.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from service.engine.groups import EntryStatus, StreamGroup

if TYPE_CHECKING:
    from conftest import TestClient

ROOT = Path(__file__).resolve().parents[2]
HUGE = 3e38  # finite in float32, but the model's matrix products overflow
MESSAGE = "produced NaN or infinity from these inputs and state"


@pytest.fixture
def client(make_client: Callable[..., TestClient], tmp_path: Path) -> TestClient:
    folder = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "co2-forecaster", folder / "co2-forecaster")
    return make_client(models_dir=folder)


def _huge_state(client: TestClient, session_id: str) -> tuple[np.ndarray, int]:
    """Give a session a state of 3e38; return its slot's state and slot (test-only backdoor)."""
    session = client.app.state.dataplane.sessions.get(session_id, None)  # type: ignore[attr-defined]
    pool = session.model.pool
    pool.scatter(np.array([session.slot]), np.full((1, 1, 1, 48), HUGE, np.float32))
    return pool.gather(np.array([session.slot])), session.slot


def test_predict_from_a_huge_state_is_refused_clearly(client: TestClient) -> None:
    body = {"inputs": [[[0.5]]], "initial_states": [{"h0": [[HUGE] * 48]}]}
    response = client.post("/v1/models/co2-forecaster/predict", json=body)
    assert response.status_code == 422 and MESSAGE in response.json()["error"]


def test_a_v2_request_from_a_huge_state_is_an_invalid_argument(client: TestClient) -> None:
    inputs = [
        {"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [0.5]},
        {"name": "h0", "shape": [1, 1, 48], "datatype": "FP32", "data": [HUGE] * 48},
    ]
    response = client.post("/v2/models/co2-forecaster/infer", json={"inputs": inputs})
    assert response.status_code == 400 and MESSAGE in response.json()["error"]


def test_a_step_that_overflows_leaves_the_state_and_count(client: TestClient) -> None:
    session_id = client.post("/v1/sessions", json={"model": "co2-forecaster"}).json()["session_id"]
    before, slot = _huge_state(client, session_id)
    response = client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[0.5]]})
    assert response.status_code == 422 and MESSAGE in response.json()["error"]
    pool = client.app.state.dataplane.sessions.get(session_id, None).model.pool  # type: ignore[attr-defined]
    np.testing.assert_array_equal(pool.gather(np.array([slot])), before)
    assert client.get(f"/v1/sessions/{session_id}").json()["step_count"] == 0


def test_an_overflowing_mux_entry_fails_alone(client: TestClient) -> None:
    dataplane = client.app.state.dataplane  # type: ignore[attr-defined]

    async def frame() -> tuple[list[int], list[int], dict[int, str]]:
        group = StreamGroup(dataplane, None)
        _, opened = await group.open("co2-forecaster", None, 3)
        _huge_state(client, opened[1].session_id)
        handles = np.array([o.handle for o in opened], np.int32)
        result = await group.step(handles, np.full((3, 1, 1), 0.5, np.float32), None)
        group.release_all()
        return result.status.tolist(), result.step_counts.tolist(), result.messages

    status, counts, messages = client.portal.call(frame)  # type: ignore[attr-defined]
    assert status == [EntryStatus.OK, EntryStatus.NOT_FINITE_OUTPUT, EntryStatus.OK]
    assert counts == [1, 0, 1] and MESSAGE in messages[1]
