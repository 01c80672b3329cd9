"""The REST API through FastAPI's test client: happy paths and every error case."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from service.engine import sessions
from service.engine.errors import ServiceError

if TYPE_CHECKING:
    from conftest import TestClient, TinyGRU

STEP_A = [[0.5, -1.0], [1.5, 0.25], [-0.3, 0.8]]
STEP_B = [[0.1, 0.2], [2.0, -2.0]]


def create(client: TestClient, **body: Any) -> str:
    response = client.post("/v1/sessions", json={"model": "tiny", **body})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


def step(client: TestClient, session_id: str, inputs: Any) -> dict[str, Any]:
    response = client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").json() == {"status": "ready"}


def test_lists_models_with_the_provider_in_use(client: TestClient) -> None:
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["version"]) for m in models] == [("tiny", 1), ("tiny", 2)]
    for model in models:
        assert model["provider"] == "CPUExecutionProvider"
        assert model["providers"] == ["CPUExecutionProvider"]
    assert models[1]["hidden_size"] == 8 and models[1]["feature_names"] == ["a", "b"]


def test_describes_one_model_and_one_version(client: TestClient) -> None:
    versions = client.get("/v1/models/tiny").json()["models"]
    assert [m["version"] for m in versions] == [1, 2]
    one = client.get("/v1/models/tiny/versions/1").json()
    assert one["hidden_size"] == 4 and one["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param(
            "/v1/models/nope", "model 'nope' not found; available models: tiny", id="model"
        ),
        pytest.param(
            "/v1/models/tiny/versions/7", "model 'tiny' has no version 7; available", id="version"
        ),
    ],
)
def test_unknown_model_or_version_is_404(client: TestClient, path: str, message: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert message in response.json()["error"]


def test_predict_runs_ragged_sequences_from_zero_state(client: TestClient, tiny: TinyGRU) -> None:
    sequences = [STEP_A, STEP_B, [[1.0, 1.0]]]
    response = client.post("/v1/models/tiny/predict", json={"inputs": sequences})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("tiny", 2)
    for seq, outputs, state in zip(sequences, body["outputs"], body["states"], strict=True):
        y, h = tiny.run(np.array(seq))
        np.testing.assert_allclose(outputs, y, atol=1e-5)
        np.testing.assert_allclose(state["hn"], h, atol=1e-5)


def test_predict_continues_from_a_given_state(client: TestClient, tiny: TinyGRU) -> None:
    first = client.post("/v1/models/tiny/predict", json={"inputs": [STEP_A]}).json()
    body = {"inputs": [STEP_B], "initial_states": first["states"]}
    body["initial_states"] = [{"h0": s["hn"]} for s in first["states"]]
    second = client.post("/v1/models/tiny/predict", json=body).json()
    y, _ = tiny.run(np.array(STEP_A + STEP_B))
    np.testing.assert_allclose(second["outputs"][0], y[len(STEP_A) :], atol=1e-5)


def test_predict_on_an_older_version(client: TestClient, tiny_v1: TinyGRU) -> None:
    body = client.post("/v1/models/tiny/predict", json={"inputs": [STEP_A], "version": 1}).json()
    assert body["version"] == 1
    np.testing.assert_allclose(body["outputs"][0], tiny_v1.run(np.array(STEP_A))[0], atol=1e-5)


def test_session_lifecycle(client: TestClient, tiny: TinyGRU) -> None:
    response = client.post("/v1/sessions", json={"model": "tiny"})
    assert response.status_code == 201
    session = response.json()
    assert (session["model"], session["version"], session["step_count"]) == ("tiny", 2, 0)
    assert session["state"] == "open" and len(session["session_id"]) >= 22
    sid = session["session_id"]
    first, second = step(client, sid, STEP_A), step(client, sid, STEP_B)
    assert (first["step_count"], second["step_count"]) == (3, 5)
    y, _ = tiny.run(np.array(STEP_A + STEP_B))
    np.testing.assert_allclose(first["outputs"] + second["outputs"], y, atol=1e-5)
    assert client.get(f"/v1/sessions/{sid}").json()["step_count"] == 5
    reset = client.post(f"/v1/sessions/{sid}/reset").json()
    assert reset["step_count"] == 0
    np.testing.assert_allclose(step(client, sid, STEP_B)["outputs"], tiny.run(STEP_B)[0], atol=1e-5)
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    gone = client.get(f"/v1/sessions/{sid}")
    assert gone.status_code == 404 and gone.json() == {"error": f"session {sid!r} not found"}


def test_a_flat_list_is_one_step(client: TestClient, tiny: TinyGRU) -> None:
    sid = create(client)
    body = step(client, sid, [0.5, -1.0])
    assert body["step_count"] == 1
    np.testing.assert_allclose(body["outputs"], tiny.run([[0.5, -1.0]])[0], atol=1e-5)


def test_session_on_a_chosen_version(client: TestClient, tiny_v1: TinyGRU) -> None:
    sid = create(client, version=1)
    np.testing.assert_allclose(
        step(client, sid, STEP_A)["outputs"], tiny_v1.run(STEP_A)[0], atol=1e-5
    )


def test_session_ids_are_unguessable(client: TestClient) -> None:
    ids = {create(client) for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) >= 32 for i in ids)  # token_urlsafe(24): 192 random bits


def test_session_ids_never_look_like_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter(["-starts-with-a-dash", "also-urlsafe"])
    monkeypatch.setattr(sessions.secrets, "token_urlsafe", lambda nbytes: next(draws))
    assert sessions.new_session_id() == "also-urlsafe"


# Each bad request: (body or raw bytes, status, words the message must contain).
BAD_STEPS = [
    pytest.param(b'{"inputs": [[1, 2]', 400, "malformed JSON", id="malformed-json"),
    pytest.param({"inputs": [[1, "a"]]}, 400, "'inputs[0][1]' is not a number: 'a'", id="string"),
    pytest.param({"inputs": [[True, 1]]}, 400, "'inputs[0][0]' is not a number", id="bool"),
    pytest.param({"inputs": [[1, None]]}, 400, "'inputs[0][1]' is not a number", id="null"),
    pytest.param(b'{"inputs": [[NaN, 1]]}', 400, "'inputs[0][0]' is nan", id="nan"),
    pytest.param(b'{"inputs": [[1, -Infinity]]}', 400, "'inputs[0][1]' is -inf", id="inf"),
    pytest.param({"inputs": [[1, 1e39]]}, 400, "beyond float32", id="float32-overflow"),
    pytest.param(
        b'{"inputs": [[1, 1' + b"0" * 400 + b"]]}",
        400,
        "'inputs[0][1]' is an integer beyond float64",
        id="huge-integer",
    ),
    # Long chunks (over 64 values) are checked with numpy first; the messages stay the same.
    pytest.param(
        b'{"inputs": [' + b"[1, 2], " * 39 + b"[1, NaN]]}",
        400,
        "'inputs[39][1]' is nan",
        id="long-nan",
    ),
    pytest.param(
        {"inputs": [[1, 2]] * 39 + [[True, 2]]},
        400,
        "'inputs[39][0]' is not a number",
        id="long-bool",
    ),
    pytest.param(
        {"inputs": [[1, 2]] * 39 + [[1, -1e39]]},
        400,
        "'inputs[39][1]' is -1e+39",
        id="long-overflow",
    ),
    pytest.param({"inputs": [[1, 2, 3]]}, 422, "has 3 values; the model expects 2", id="features"),
    pytest.param({"inputs": [[1, 2], [1]]}, 422, "'inputs[1]' has 1 values", id="ragged"),
    pytest.param({"inputs": [[1, 2], 3]}, 422, "'inputs[1]' must be a list", id="mixed"),
    pytest.param({"inputs": []}, 422, "'inputs' is empty", id="empty"),
    pytest.param({"inputs": [[]]}, 422, "has 0 values", id="empty-step"),
    pytest.param({}, 422, "inputs: Field required", id="missing"),
    pytest.param({"inputs": 5}, 422, "inputs: Input should be a valid list", id="not-a-list"),
    pytest.param({"inputs": [[1, 2]], "extra": 1}, 422, "extra: Extra inputs", id="extra-field"),
    pytest.param([1, 2], 422, "body must be a JSON object", id="array-body"),
    pytest.param({"inputs": [[1, 2]] * 65}, 413, "65 steps; at most 64", id="chunk-too-long"),
    pytest.param(
        {"inputs": [[1.0, 2.0]] * 9000}, 413, "larger than the limit of 65536 bytes", id="body"
    ),
]


def test_long_chunk_matches_the_reference(client: TestClient, tiny: TinyGRU) -> None:
    inputs = np.random.default_rng(7).standard_normal((40, 2)).round(3).tolist()
    inputs[5][1] = 2  # ints and floats mix
    body = step(client, create(client), inputs)
    assert body["step_count"] == 40
    np.testing.assert_allclose(body["outputs"], tiny.run(inputs)[0], atol=1e-5)


def test_a_value_that_rounds_to_the_float32_maximum_is_accepted(client: TestClient) -> None:
    sid = create(client)
    response = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[3.4028235e38, 0.0]]})
    assert response.status_code == 200, response.text
    assert response.json()["step_count"] == 1


def test_short_chunk_of_large_valid_values_is_accepted(client: TestClient) -> None:
    # Their sum is beyond float32: the quick range test fails and the exact check accepts them.
    sid = create(client)
    inputs = [[3.0e38, -3.0e38], [2.0e38, 1.0]]
    response = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert response.json()["step_count"] == 2


@pytest.mark.parametrize(("body", "status", "message"), BAD_STEPS)
def test_bad_step_is_rejected_and_leaves_the_state(
    client: TestClient, tiny: TinyGRU, body: Any, status: int, message: str
) -> None:
    sid = create(client)
    step(client, sid, STEP_A)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(
        f"/v1/sessions/{sid}/steps", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert set(response.json()) == {"error"}
    after = step(client, sid, STEP_B)  # the state and count are exactly as before the bad step
    assert after["step_count"] == 5
    np.testing.assert_allclose(after["outputs"], tiny.run(STEP_A + STEP_B)[0][3:], atol=1e-5)


PARITY_CASES = [
    *BAD_STEPS,
    pytest.param(b"", 422, "the request body is missing", id="no-body"),
    pytest.param({"inputs": STEP_A, "expected_step_count": -1}, 422, "greater than", id="neg"),
    pytest.param({"inputs": STEP_A, "expected_step_count": "3"}, 422, "valid integer", id="str"),
    pytest.param({"inputs": STEP_A, "expected_step_count": 2}, 409, "is at step 0", id="count"),
]


@pytest.mark.parametrize(("body", "status", "message"), PARITY_CASES)
def test_the_raw_step_path_answers_as_the_fastapi_route(
    make_client: Callable[..., TestClient], body: Any, status: int, message: str
) -> None:
    """The per-step handler that runs ahead of FastAPI gives the route's statuses and messages."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answers = []
    for fast in (True, False):
        client = make_client(fast_paths=fast)
        sid = create(client)
        response = client.post(
            f"/v1/sessions/{sid}/steps",
            content=content,
            headers={"content-type": "application/json"},
        )
        answer = json.loads(response.text.replace(sid, "SESSION"))
        answers.append((response.status_code, answer))
    (fast_status, fast_body), (routed_status, routed_body) = answers
    assert fast_status == routed_status == status
    assert message in fast_body["error"] and message in routed_body["error"]
    if "malformed" not in message:  # the two JSON parsers word syntax errors differently
        assert fast_body == routed_body


def test_a_step_applies_only_at_the_expected_step_count(client: TestClient, tiny: TinyGRU) -> None:
    sid = create(client)
    first = client.post(
        f"/v1/sessions/{sid}/steps", json={"inputs": STEP_A, "expected_step_count": 0}
    )
    assert first.status_code == 200 and first.json()["step_count"] == 3
    retry = client.post(  # the same request again, e.g. after a lost answer: not applied twice
        f"/v1/sessions/{sid}/steps", json={"inputs": STEP_A, "expected_step_count": 0}
    )
    assert retry.status_code == 409
    assert retry.json()["step_count"] == 3 and "is at step 3, not 0" in retry.json()["error"]
    after = client.post(
        f"/v1/sessions/{sid}/steps", json={"inputs": STEP_B, "expected_step_count": 3}
    )
    assert after.status_code == 200 and after.json()["step_count"] == 5
    np.testing.assert_allclose(after.json()["outputs"], tiny.run(STEP_A + STEP_B)[0][3:], atol=1e-5)


def test_body_over_the_limit_is_rejected_while_streaming(client: TestClient) -> None:
    sid = create(client)

    def chunks() -> Any:
        yield b'{"inputs": ['
        for _ in range(8000):
            yield b"[1.0, 2.0],"
        yield b"[1.0, 2.0]]}"

    response = client.post(  # a generator body is sent chunked, without Content-Length
        f"/v1/sessions/{sid}/steps", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "larger than the limit of 65536 bytes" in response.json()["error"]
    assert client.get(f"/v1/sessions/{sid}").json()["step_count"] == 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        pytest.param({"model": "nope"}, 404, "model 'nope' not found", id="model"),
        pytest.param({"model": "tiny", "version": 9}, 404, "has no version 9", id="version"),
        pytest.param({"version": 1}, 422, "model: Field required", id="no-model"),
        pytest.param({"model": "tiny", "version": "x"}, 422, "version: Input should be", id="v"),
    ],
)
def test_bad_session_creation(client: TestClient, body: Any, status: int, message: str) -> None:
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("get", ""), ("post", "/steps"), ("post", "/reset"), ("delete", "")],
    ids=["get", "steps", "reset", "delete"],
)
def test_unknown_session_is_404(client: TestClient, method: str, suffix: str) -> None:
    kwargs: dict[str, Any] = {"json": {"inputs": STEP_A}} if suffix == "/steps" else {}
    response = getattr(client, method)(f"/v1/sessions/nope{suffix}", **kwargs)
    assert response.status_code == 404
    assert response.json() == {"error": "session 'nope' not found"}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        pytest.param({"inputs": [STEP_A, [[1, 2, 3]]]}, 422, "'inputs[1][0]' has 3", id="features"),
        pytest.param({"inputs": []}, 422, "non-empty list of sequences", id="empty"),
        pytest.param({"inputs": [STEP_A], "version": 5}, 404, "has no version 5", id="version"),
        pytest.param(
            {"inputs": [STEP_A], "initial_states": [{"h0": [[0.0] * 8]}]},
            422,
            "'initial_states[0].h0' must be a list of 2 rows",
            id="state-layers",
        ),
        pytest.param(
            {"inputs": [STEP_A], "initial_states": [{"c0": []}]},
            422,
            "initial_states[0] must be an object with keys ['h0']",
            id="state-keys",
        ),
        pytest.param(
            {"inputs": [STEP_A, STEP_B], "initial_states": [{"h0": [[0.0] * 8] * 2}]},
            422,
            "1 initial states for 2 sequences",
            id="state-count",
        ),
        pytest.param({"inputs": [[[1, 2]] * 65]}, 413, "at most 64 steps", id="too-long"),
    ],
)
def test_bad_predict(client: TestClient, body: Any, status: int, message: str) -> None:
    response = client.post("/v1/models/tiny/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_predict_on_unknown_model(client: TestClient) -> None:
    response = client.post("/v1/models/nope/predict", json={"inputs": [STEP_A]})
    assert response.status_code == 404 and "model 'nope' not found" in response.json()["error"]


def test_max_sessions_is_503_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_sessions=2)
    create(client)
    create(client)
    response = client.post("/v1/sessions", json={"model": "tiny"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "limit of 2 open sessions" in response.json()["error"]


def test_deleting_frees_the_slot_for_a_new_session(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_sessions=1)
    sid = create(client)
    step(client, sid, STEP_A)
    client.delete(f"/v1/sessions/{sid}")
    fresh = create(client)
    assert step(client, fresh, STEP_B)["step_count"] == 2


def test_stats_count_batches(client: TestClient) -> None:
    sid = create(client)
    step(client, sid, STEP_A)
    stats = client.get("/v1/stats").json()
    assert stats["sessions"] == 1
    tiny2 = next(m for m in stats["models"] if m["version"] == 2)
    assert tiny2["batches"] == 1 and tiny2["chunks"] == 1 and tiny2["sessions"] == 1
    assert tiny2["steps"] == len(STEP_A)
    assert tiny2["step_latency_ms"]["p50"] > 0


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_openapi_has_examples_on_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            ok = next(r for code, r in operation["responses"].items() if code.startswith("2"))
            content = ok.get("content", {}).get("application/json")
            if content is None:  # no body: a delete, or a load or unload (empty, as in Triton)
                assert method == "delete" or path.startswith("/v2/repository/models/"), path
                continue
            ref = content["schema"]["$ref"].rsplit("/", 1)[-1]
            assert "examples" in schemas[ref] or ref == "ModelList", (path, ref)
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("array", "message"),
    [
        pytest.param(np.zeros((2, 3), np.float32), "shape (steps >= 1, 2)", id="features"),
        pytest.param(np.zeros((0, 2), np.float32), "shape (steps >= 1, 2)", id="empty"),
        pytest.param(np.zeros((2, 2), np.float64), "must be float32", id="dtype"),
        pytest.param(np.zeros((65, 2), np.float32), "at most 64 steps", id="too-long"),
        pytest.param(np.array([[1, np.inf]], np.float32), "'x[0][1]' is inf", id="inf"),
    ],
)
def test_binary_chunks_are_checked_like_json_ones(
    client: TestClient, array: np.ndarray, message: str
) -> None:
    dataplane = client.app.state.dataplane  # type: ignore[attr-defined]
    model = dataplane.model("tiny")
    with pytest.raises(ServiceError) as info:
        dataplane.parse_chunk(model, array, "x", allow_flat=False)
    assert message in info.value.message
