"""The Open Inference Protocol, driven by the unmodified ``tritonclient`` against a live server."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

TOLERANCE = 1e-5


@pytest.fixture
def live(make_server: Callable[..., Any]) -> Any:
    return make_server()


@pytest.fixture
def client(live: Any) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(
        live.http_url.removeprefix("http://"), network_timeout=10.0
    )
    yield connection
    connection.close()


def _x_input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
    return tensor


def _native_predict(live: Any, sequences: list[np.ndarray]) -> dict[str, Any]:
    body = {"inputs": [s.tolist() for s in sequences]}
    response = httpx.post(f"{live.http_url}/v1/models/tiny/predict", json=body, timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "sequence"} <= set(server["extensions"])
    meta = client.get_model_metadata("tiny")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, -1, 2]}
    assert [o["name"] for o in meta["outputs"]] == ["y", "hn"]
    assert client.get_model_metadata("tiny", "1")["versions"] == ["1"]
    config = client.get_model_config("tiny")
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "sequence_batching" in config


def test_state_and_lengths_inputs_are_optional(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("tiny")
    optional = {i["name"]: i.get("optional", False) for i in config["input"]}
    assert optional == {"x": False, "h0": True, "lengths": True}
    meta = client.get_model_metadata("tiny")
    assert {i["name"]: i.get("optional", False) for i in meta["inputs"]} == optional
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, -1, 2]}
    result = client.infer(
        "tiny", [_x_input(np.ones((1, 2, 2)))], sequence_id=3, sequence_start=True
    )
    assert result.as_numpy("y").shape == (1, 2, 1)  # x alone, as Triton's tools send it


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_stateless_infer_equals_the_native_api(
    client: triton.InferenceServerClient, live: Any, binary: bool
) -> None:
    x = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(np.float32)
    outputs = [
        triton.InferRequestedOutput("y", binary_data=binary),
        triton.InferRequestedOutput("hn", binary_data=binary),
    ]
    result = client.infer("tiny", [_x_input(x, binary)], outputs=outputs)
    native = _native_predict(live, list(x))
    np.testing.assert_allclose(result.as_numpy("y"), np.array(native["outputs"]), atol=TOLERANCE)
    hn = np.stack([np.array(s["hn"]) for s in native["states"]], axis=1)  # (L, B, m)
    np.testing.assert_allclose(result.as_numpy("hn"), hn, atol=TOLERANCE)


def test_default_request_gets_every_output_in_binary(
    client: triton.InferenceServerClient, live: Any
) -> None:
    x = np.random.default_rng(1).normal(size=(1, 4, 2)).astype(np.float32)
    result = client.infer("tiny", [_x_input(x)])
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["y", "hn"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    native = _native_predict(live, [x[0]])
    np.testing.assert_allclose(result.as_numpy("y")[0], native["outputs"][0], atol=TOLERANCE)


def test_requested_outputs_are_honoured(client: triton.InferenceServerClient) -> None:
    x = np.ones((1, 2, 2), dtype=np.float32)
    result = client.infer("tiny", [_x_input(x)], outputs=[triton.InferRequestedOutput("hn")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["hn"]
    assert result.as_numpy("y") is None


def test_ragged_rows_through_lengths(client: triton.InferenceServerClient, live: Any) -> None:
    x = np.random.default_rng(2).normal(size=(2, 6, 2)).astype(np.float32)
    lengths = triton.InferInput("lengths", [2], "INT64")
    lengths.set_data_from_numpy(np.array([6, 3], dtype=np.int64))
    result = client.infer("tiny", [_x_input(x), lengths])
    native = _native_predict(live, [x[0], x[1, :3]])
    y = result.as_numpy("y")
    np.testing.assert_allclose(y[1, :3], native["outputs"][1], atol=TOLERANCE)
    assert np.all(y[1, 3:] == 0)
    np.testing.assert_allclose(
        result.as_numpy("hn")[:, 1], native["states"][1]["hn"], atol=TOLERANCE
    )


def test_gzip_request_body(client: triton.InferenceServerClient, live: Any) -> None:
    x = np.random.default_rng(3).normal(size=(1, 3, 2)).astype(np.float32)
    result = client.infer("tiny", [_x_input(x)], request_compression_algorithm="gzip")
    native = _native_predict(live, [x[0]])
    np.testing.assert_allclose(result.as_numpy("y")[0], native["outputs"][0], atol=TOLERANCE)


@pytest.mark.parametrize("sequence_id", [42, "sensor-7"], ids=["uint64", "string"])
def test_a_sequence_carries_state_across_requests(
    client: triton.InferenceServerClient, live: Any, sequence_id: int | str
) -> None:
    series = np.random.default_rng(4).normal(size=(9, 2)).astype(np.float32)
    chunks = [series[:2], series[2:3], series[3:7], series[7:]]
    outputs = []
    for i, chunk in enumerate(chunks):
        result = client.infer(
            "tiny",
            [_x_input(chunk[None])],
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(chunks) - 1,
        )
        outputs.append(result.as_numpy("y")[0])
        parameters = result.get_response()["parameters"]
        assert parameters["step_count"] == sum(len(c) for c in chunks[: i + 1])
    native = _native_predict(live, [series])
    np.testing.assert_allclose(np.concatenate(outputs), native["outputs"][0], atol=TOLERANCE)
    error = _error(
        lambda: client.infer("tiny", [_x_input(series[None, :1])], sequence_id=sequence_id)
    )
    assert error.status() == "400"
    assert "must specify the START flag" in error.message()


def test_a_sequence_is_a_v1_session(client: triton.InferenceServerClient, live: Any) -> None:
    x = np.ones((1, 3, 2), dtype=np.float32)
    result = client.infer("tiny", [_x_input(x)], sequence_id=5, sequence_start=True)
    session_id = result.get_response()["parameters"]["session_id"]
    session = httpx.get(f"{live.http_url}/v1/sessions/{session_id}", timeout=10).json()
    assert session["step_count"] == 3
    assert session["model"] == "tiny"
    client.infer("tiny", [_x_input(x)], sequence_id=5, sequence_end=True)
    gone = httpx.get(f"{live.http_url}/v1/sessions/{session_id}", timeout=10)
    assert gone.status_code == 404


def test_restarting_a_sequence_starts_from_zero(
    client: triton.InferenceServerClient, live: Any
) -> None:
    x = np.random.default_rng(5).normal(size=(1, 4, 2)).astype(np.float32)
    client.infer("tiny", [_x_input(x)], sequence_id=9, sequence_start=True)
    again = client.infer("tiny", [_x_input(x)], sequence_id=9, sequence_start=True)
    native = _native_predict(live, [x[0]])
    np.testing.assert_allclose(again.as_numpy("y")[0], native["outputs"][0], atol=TOLERANCE)


def test_unknown_sequence_without_start_uses_tritons_message(
    client: triton.InferenceServerClient,
) -> None:
    error = _error(lambda: client.infer("tiny", [_x_input(np.ones((1, 1, 2)))], sequence_id=1234))
    assert error.status() == "400"
    assert error.message() == (
        "inference request for sequence 1234 to model 'tiny' must specify the START flag on "
        "the first request of the sequence"
    )


def test_sequence_ids_are_scoped_per_api_key(make_server: Callable[..., Any]) -> None:
    live = make_server(api_keys=["key-a", "key-b"])
    url = live.http_url.removeprefix("http://")
    x = _x_input(np.ones((1, 1, 2)))
    as_a = triton.InferenceServerClient(url)
    as_a.infer("tiny", [x], sequence_id=7, sequence_start=True, headers=_bearer("key-a"))
    as_a.infer("tiny", [x], sequence_id=7, headers=_bearer("key-a"))
    error = _error(lambda: as_a.infer("tiny", [x], sequence_id=7, headers=_bearer("key-b")))
    assert error.status() == "400" and "START flag" in error.message()
    unauthorized = _error(lambda: as_a.infer("tiny", [x], sequence_id=7))
    assert unauthorized.status() == "401"
    assert as_a.is_server_live()  # health needs no key


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _raw_infer(live: Any, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{live.http_url}/v2/models/tiny/infer",
        content=json.dumps(body).encode(),
        headers=headers,
        timeout=10,
    )


def _x_json(shape: list[int], data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(_x_json([1, 2, 2], [1, 2, 3, 4], "FP64"), "must be FP32", id="datatype"),
        pytest.param(_x_json([1, 2, 3], [0] * 6), "shape [batch, time, 2]", id="features"),
        pytest.param(_x_json([2, 2], [0] * 4), "shape [batch, time, 2]", id="rank"),
        pytest.param(_x_json([1, 2, 2], [1, 2, 3]), "has 3 values", id="data-length"),
        pytest.param(_x_json([1, 1, 2], [1, "a"]), "not a number", id="non-numeric"),
        pytest.param(_x_json([1, 1, 2], [[[1.0, 2.0]]]), None, id="nested-is-fine"),
        pytest.param({"inputs": []}, "non-empty list", id="no-inputs"),
        pytest.param(
            {"inputs": [{"name": "w", "shape": [1], "datatype": "FP32", "data": [1]}]},
            "unexpected input 'w'",
            id="unknown-input",
        ),
        pytest.param(
            {**_x_json([1, 1, 2], [1, 2]), "outputs": [{"name": "z"}]},
            "unknown output 'z'",
            id="unknown-output",
        ),
        pytest.param(
            {"inputs": [*_x_json([1, 1, 2], [1, 2])["inputs"], *_x_json([1], [1])["inputs"]]},
            "given twice",
            id="duplicate-input",
        ),
        pytest.param(
            {**_x_json([2, 1, 2], [1, 2, 3, 4]), "parameters": {"sequence_id": 3}},
            "batch 1",
            id="sequence-batch",
        ),
        pytest.param(
            {**_x_json([1, 1, 2], [1, 2]), "parameters": {"sequence_id": -1}},
            "sequence_id",
            id="negative-sequence-id",
        ),
        pytest.param(
            {**_x_json([1, 100, 2], [0.5] * 200)},
            "at most 64 steps",
            id="chunk-over-the-limit",
        ),
        pytest.param(_x_json([1] * 70, [0.5]), "70 dimensions; at most 8", id="rank-70"),
        pytest.param(
            {**_x_json([1, 1, 2], [1, 2]), "parameters": {"sequence_id": "s" * 300}},
            "300 bytes long; at most 256",
            id="long-sequence-id",
        ),
        pytest.param(
            {**_x_json([1, 1, 2], [1, 2]), "parameters": {"expected_step_count": 2}},
            "need a non-zero sequence_id",
            id="count-without-sequence",
        ),
        pytest.param(
            {
                **_x_json([1, 1, 2], [1, 2]),
                "parameters": {"sequence_id": 5, "sequence_start": True, "expected_step_count": -1},
            },
            "expected_step_count must be an integer >= 0",
            id="negative-count",
        ),
    ],
)
def test_invalid_requests_get_a_clear_400(live: Any, body: Any, message: str | None) -> None:
    response = _raw_infer(live, body)
    if message is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_nan_is_rejected(live: Any) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "FP32", "data": [NaN, 1]}]}'
    response = httpx.post(f"{live.http_url}/v2/models/tiny/infer", content=body, timeout=10)
    assert response.status_code == 400
    binary = np.array([[[np.nan, 1.0]]], dtype=np.float32)
    error = _error(
        lambda: triton.InferenceServerClient(live.http_url.removeprefix("http://")).infer(
            "tiny", [_x_input(binary)]
        )
    )
    assert error.status() == "400" and "NaN" in error.message()


def test_binary_size_that_does_not_match_the_shape(live: Any) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    response = httpx.post(
        f"{live.http_url}/v2/models/tiny/infer",
        content=header + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert response.status_code == 400
    assert "needs 16" in response.json()["error"]


def test_unknown_model_is_404(client: triton.InferenceServerClient) -> None:
    error = _error(lambda: client.infer("nope", [_x_input(np.ones((1, 1, 2)))]))
    assert error.status() == "404"
    assert "model 'nope' not found" in error.message()


def test_a_rejected_sequence_request_leaves_the_state(
    client: triton.InferenceServerClient, live: Any
) -> None:
    series = np.random.default_rng(6).normal(size=(5, 2)).astype(np.float32)
    client.infer("tiny", [_x_input(series[None, :2])], sequence_id=11, sequence_start=True)
    bad = _x_input(np.ones((1, 1, 2), dtype=np.float32))
    bad_output = [triton.InferRequestedOutput("nope")]
    _error(lambda: client.infer("tiny", [bad], outputs=bad_output, sequence_id=11))
    # The restart of an existing sequence with a bad body must not drop the sequence either.
    too_long = _x_input(np.ones((1, 100, 2), dtype=np.float32))
    _error(lambda: client.infer("tiny", [too_long], sequence_id=11, sequence_start=True))
    rest = client.infer("tiny", [_x_input(series[None, 2:])], sequence_id=11, sequence_end=True)
    native = _native_predict(live, [series])
    np.testing.assert_allclose(rest.as_numpy("y")[0], native["outputs"][0][2:], atol=TOLERANCE)


def test_compressed_bomb_is_refused(live: Any) -> None:
    body = gzip.compress(b" " * (1 << 20))
    response = httpx.post(
        f"{live.http_url}/v2/models/tiny/infer",
        content=body,
        headers={"Content-Encoding": "gzip"},
        timeout=10,
    )
    assert response.status_code == 413
    assert "decompressed request body is larger" in response.json()["error"]


V2_PARITY = [
    pytest.param(
        "/v2/models/tiny/infer",
        {"inputs": [{"name": "x", "shape": [1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        id="stateless-json",
    ),
    pytest.param(
        "/v2/models/tiny/versions/1/infer",
        {
            "id": "r1",
            "parameters": {"sequence_id": 7, "sequence_start": True},
            "inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "FP32", "data": [0.5, 1]}],
        },
        id="sequence",
    ),
    pytest.param(
        "/v2/models/tiny/infer",
        {"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0] * 6}]},
        id="bad-shape",
    ),
    pytest.param("/v2/models/nope/infer", {"inputs": []}, id="unknown-model"),
    pytest.param("/v2/models/tiny/versions/x/infer", {"inputs": []}, id="bad-version"),
    pytest.param("/v2/models/tiny/infer", b'{"inputs": [', id="malformed"),
]


@pytest.mark.parametrize(("path", "body"), V2_PARITY)
def test_the_raw_infer_path_answers_as_the_fastapi_route(
    make_client: Callable[..., Any], path: str, body: Any
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answers = []
    for fast in (True, False):
        response = make_client(fast_paths=fast).post(path, content=content)
        answer = response.json()
        answer.get("parameters", {}).pop("session_id", None)  # a new random id on each server
        answers.append((response.status_code, answer, response.headers["content-type"]))
    assert answers[0] == answers[1]


def test_the_raw_infer_path_answers_binary_requests_as_the_fastapi_route(
    make_client: Callable[..., Any],
) -> None:
    x = np.arange(6, dtype="<f4").reshape(1, 3, 2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 3, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    answers = []
    for fast in (True, False):
        response = make_client(fast_paths=fast).post(
            "/v2/models/tiny/infer",
            content=header + x.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert response.status_code == 200
        answers.append((response.content, response.headers["inference-header-content-length"]))
    assert answers[0] == answers[1]


def _sequence_request(
    sequence_id: int, start: bool = False, end: bool = False, **parameters: Any
) -> dict[str, Any]:
    flags = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    return {**_x_json([1, 1, 2], [0.5, -0.5]), "parameters": {**flags, **parameters}}


async def test_concurrent_requests_of_one_sequence_run_in_order_never_500(live: Any) -> None:
    """Four concurrent sequence_end requests: the first ends the sequence, the others find it
    gone and change nothing."""
    assert _raw_infer(live, _sequence_request(9, start=True)).status_code == 200
    async with httpx.AsyncClient(base_url=live.http_url, timeout=10) as client:
        answers = await asyncio.gather(
            *(
                client.post("/v2/models/tiny/infer", json=_sequence_request(9, end=True))
                for _ in range(4)
            )
        )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 400, 400, 400]
    ended = next(a for a in answers if a.status_code == 200).json()["parameters"]
    assert ended["step_count"] == 2
    for answer in answers:
        if answer.status_code == 400:
            assert "must specify the START flag" in answer.json()["error"]


def test_expected_step_count_makes_a_retried_sequence_request_safe(live: Any) -> None:
    first = _raw_infer(live, _sequence_request(11, start=True, expected_step_count=0))
    assert first.status_code == 200
    again = _raw_infer(live, _sequence_request(11, expected_step_count=1))
    retry = _raw_infer(live, _sequence_request(11, expected_step_count=1))  # answer was "lost"
    assert again.status_code == 200 and again.json()["parameters"]["step_count"] == 2
    assert retry.status_code == 409 and retry.json()["step_count"] == 2
    assert "is at step 2, not 1" in retry.json()["error"]


def test_a_sequence_whose_session_ends_leaves_no_entry(make_client: Callable[..., Any]) -> None:
    client = make_client(idle_ttl_s=0.2)
    for sequence_id in range(1, 31):
        body = _sequence_request(sequence_id, start=True)
        assert client.post("/v2/models/tiny/infer", json=body).status_code == 200
    table = client.app.state.v2_sequences
    assert len(table.map) == 30
    end = _sequence_request(1, end=True)
    assert client.post("/v2/models/tiny/infer", json=end).status_code == 200
    assert len(table.map) == 29
    deadline = time.monotonic() + 10
    while len(table.map) and time.monotonic() < deadline:  # the other 29 expire idle
        time.sleep(0.05)
    assert len(table.map) == 0
    later = client.post("/v2/models/tiny/infer", json=_sequence_request(2))
    assert later.status_code == 404 and "expired after 0.2 s idle" in later.json()["error"]
    again = client.post("/v2/models/tiny/infer", json=_sequence_request(2))
    assert again.status_code == 400 and "START flag" in again.json()["error"]
