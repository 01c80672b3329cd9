"""Session expiry, ownership and slot reuse."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from conftest import TestClient, TinyGRU

STEPS = [[0.5, -1.0], [1.5, 0.25]]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_idle_session_expires_with_a_clear_404(make_client: Callable[..., TestClient]) -> None:
    client = make_client(idle_ttl_s=0.2)
    sid = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    wait_until(lambda: client.get("/v1/stats").json()["sessions"] == 0)  # the sweeper ran
    response = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS})
    assert response.status_code == 404
    assert response.json()["error"] == (
        f"session {sid!r} expired after 0.2 s idle; create a new session"
    )


def test_steps_keep_a_session_alive(make_client: Callable[..., TestClient]) -> None:
    client = make_client(idle_ttl_s=0.5)
    sid = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    for _ in range(6):
        time.sleep(0.15)
        assert client.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS}).status_code == 200


def test_expired_slot_is_reused_zeroed(
    make_client: Callable[..., TestClient], tiny: TinyGRU
) -> None:
    client = make_client(idle_ttl_s=0.2, max_sessions=1)
    sid = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    client.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS})
    wait_until(lambda: client.get("/v1/stats").json()["sessions"] == 0)
    fresh = client.post("/v1/sessions", json={"model": "tiny"})
    assert fresh.status_code == 201
    out = client.post(f"/v1/sessions/{fresh.json()['session_id']}/steps", json={"inputs": STEPS})
    np.testing.assert_allclose(out.json()["outputs"], tiny.run(STEPS)[0], atol=1e-5)


def test_ttl_zero_never_expires(make_client: Callable[..., TestClient]) -> None:
    client = make_client(idle_ttl_s=0)
    sid = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    time.sleep(0.3)
    assert client.get(f"/v1/sessions/{sid}").status_code == 200


KEYS = "alpha-key,beta-key"


@pytest.fixture
def keyed(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=KEYS)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, "needs an API key", id="missing"),
        pytest.param(auth("wrong"), "the API key is not valid", id="wrong"),
        pytest.param({"Authorization": "Basic abc"}, "must be 'Bearer <key>'", id="scheme"),
    ],
)
def test_requests_without_a_valid_key_are_401(
    keyed: TestClient, headers: dict[str, str], message: str
) -> None:

    for method, path in [("get", "/v1/models"), ("post", "/v1/sessions"), ("get", "/v1/stats")]:
        response = getattr(keyed, method)(path, headers=headers)
        assert response.status_code == 401, path
        assert message in response.json()["error"]


def test_without_keys_an_authorization_header_is_ignored(client: TestClient) -> None:
    # A proxy in front of an unauthenticated service may add credentials of its own.
    for value in ("Basic dXNlcjpwdw==", "Bearer whatever"):
        response = client.post(
            "/v1/sessions", json={"model": "tiny"}, headers={"Authorization": value}
        )
        assert response.status_code == 201, response.text


def test_health_needs_no_key(keyed: TestClient) -> None:
    assert keyed.get("/health/ready").status_code == 200


def test_a_session_is_visible_only_to_its_key(keyed: TestClient, tiny: TinyGRU) -> None:
    created = keyed.post("/v1/sessions", json={"model": "tiny"}, headers=auth("alpha-key"))
    sid = created.json()["session_id"]
    keyed.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS}, headers=auth("alpha-key"))
    for method, suffix in [("get", ""), ("post", "/reset"), ("delete", "")]:
        response = getattr(keyed, method)(f"/v1/sessions/{sid}{suffix}", headers=auth("beta-key"))
        assert response.status_code == 404
        assert response.json() == {"error": f"session {sid!r} not found"}
    stolen = keyed.post(
        f"/v1/sessions/{sid}/steps", json={"inputs": STEPS}, headers=auth("beta-key")
    )
    assert stolen.status_code == 404
    own = keyed.post(f"/v1/sessions/{sid}/steps", json={"inputs": STEPS}, headers=auth("alpha-key"))
    assert own.json()["step_count"] == 4  # the other key's attempts changed nothing
    np.testing.assert_allclose(own.json()["outputs"], tiny.run(STEPS + STEPS)[0][2:], atol=1e-5)


def test_one_key_cannot_take_every_session(make_client: Callable[..., Any]) -> None:
    client = make_client(api_keys=["alice", "bob"], max_sessions=10, max_sessions_per_key=3)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    made = [client.post("/v1/sessions", json={"model": "tiny"}, headers=alice) for _ in range(3)]
    assert [r.status_code for r in made] == [201, 201, 201]
    refused = client.post("/v1/sessions", json={"model": "tiny"}, headers=alice)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "holds 3 open sessions, the most one key may" in refused.json()["error"]
    assert client.post("/v1/sessions", json={"model": "tiny"}, headers=bob).status_code == 201
    first = made[0].json()["session_id"]
    assert client.delete(f"/v1/sessions/{first}", headers=alice).status_code == 204
    assert client.post("/v1/sessions", json={"model": "tiny"}, headers=alice).status_code == 201
    with client.websocket_connect("/v1/stream?model=tiny&token=alice") as ws:
        closed = ws.receive()
    assert closed["code"] == 4429
