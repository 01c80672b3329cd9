"""KServe V2 over gRPC, driven by the unmodified ``tritonclient.grpc`` against a live server.

The live server runs uvicorn on uvloop in a thread; the gRPC server runs in its event loop, as in
``python -m service``. References come from the HTTP API of the same server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from loopback import HOST, free_port
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.__main__ import settings_from_args
from service.app import create_app
from service.engine import errors
from service.engine.store.errors import StoreUnavailable
from service.grpc.proto import grpc_service_pb2 as pb
from service.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from service.grpc.server import GrpcPortUnavailable
from service.grpc.servicer import InferenceServicer
from service.settings import Settings
from service.v2.infer import InferResult

TOLERANCE = 1e-5
WAIT_S = 20.0  # the longest any answer may take on a busy machine


@dataclass
class Endpoints:
    """A live server's HTTP base URL and gRPC address."""

    live: Any  # conftest.LiveServer
    grpc: str

    @property
    def http(self) -> str:
        return str(self.live.http_url)


@pytest.fixture
def make_endpoints(make_server: Callable[..., Any]) -> Callable[..., Endpoints]:
    def build(**overrides: Any) -> Endpoints:
        port = free_port()
        return Endpoints(make_server(grpc_port=port, **overrides), f"{HOST}:{port}")

    return build


@pytest.fixture
def endpoints(make_endpoints: Callable[..., Endpoints]) -> Endpoints:
    return make_endpoints()


@pytest.fixture
def client(endpoints: Endpoints) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(endpoints.grpc)
    yield connection
    connection.close()


class Answers:
    """A stream callback that queues ``(result, error)`` pairs for the test to take."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()

    def __call__(self, result: Any, error: InferenceServerException | None) -> None:
        self.queue.put((result, error))

    def take(self, count: int) -> list[tuple[Any, InferenceServerException | None]]:
        return [self.queue.get(timeout=WAIT_S) for _ in range(count)]


def _x(values: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32))
    return tensor


def _y_only() -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput("y")]


def _error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def _http_predict(endpoints: Endpoints, sequences: list[np.ndarray]) -> dict[str, Any]:
    body = {"inputs": [s.tolist() for s in sequences]}
    response = httpx.post(f"{endpoints.http}/v1/models/tiny/predict", json=body, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _http_steps(endpoints: Endpoints, chunks: list[np.ndarray], key: str | None = None) -> Any:
    """The outputs of ``chunks`` stepped one after another through a ``/v1`` session."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=endpoints.http, headers=headers, timeout=WAIT_S) as http:
        session = http.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
        outputs = [
            http.post(f"/v1/sessions/{session}/steps", json={"inputs": c.tolist()}).json()
            for c in chunks
        ]
        http.delete(f"/v1/sessions/{session}")
    return np.concatenate([np.array(o["outputs"]) for o in outputs])


# -- health, metadata, config -----------------------------------------------------------------


def test_health_metadata_and_config(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("tiny", "9")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "rnnserve"
    assert {"binary_tensor_data", "sequence"} <= set(server["extensions"])
    meta = client.get_model_metadata("tiny")
    assert list(meta.versions) == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == (
        "x",
        "FP32",
        [-1, -1, 2],
    )
    assert [o.name for o in meta.outputs] == ["y", "hn"]
    assert list(client.get_model_metadata("tiny", "1").versions) == ["1"]
    config = client.get_model_config("tiny").config
    assert config.name == "tiny" and config.max_batch_size == 0
    assert [i.name for i in config.input] == ["x", "h0", "lengths"]
    assert config.input[0].data_type == 11  # TYPE_FP32
    assert list(config.input[1].dims) == [2, -1, 8]
    assert config.HasField("sequence_batching")
    assert config.sequence_batching.max_sequence_idle_microseconds == 600 * 1_000_000
    assert config.parameters["hidden_size"].string_value == "8"


def test_config_carries_what_the_http_config_says(
    client: triton.InferenceServerClient, endpoints: Endpoints
) -> None:
    grpc_config = client.get_model_config("tiny", as_json=True)["config"]
    http_config = httpx.get(f"{endpoints.http}/v2/models/tiny/config", timeout=WAIT_S).json()
    for field in ("name", "platform", "parameters"):
        assert grpc_config[field] == http_config[field]
    for grpc_input, http_input in zip(grpc_config["input"], http_config["input"], strict=True):
        assert grpc_input["name"] == http_input["name"]
        assert grpc_input["data_type"] == http_input["data_type"]
        assert [int(d) for d in grpc_input["dims"]] == http_input["dims"]
        assert grpc_input.get("optional", False) == http_input.get("optional", False)


# -- stateless inference ----------------------------------------------------------------------


def test_stateless_infer_equals_the_http_path(
    client: triton.InferenceServerClient, endpoints: Endpoints
) -> None:
    x = np.random.default_rng(0).normal(size=(3, 5, 2)).astype(np.float32)
    result = client.infer("tiny", [_x(x)], request_id="req-1")
    http = triton_http.InferenceServerClient(endpoints.http.removeprefix("http://"))
    expected = http.infer("tiny", [_http_x(x)])
    http.close()
    response = result.get_response()
    assert response.id == "req-1" and response.model_version == "2"
    assert [o.name for o in response.outputs] == ["y", "hn"]
    np.testing.assert_allclose(result.as_numpy("y"), expected.as_numpy("y"), atol=TOLERANCE)
    np.testing.assert_allclose(result.as_numpy("hn"), expected.as_numpy("hn"), atol=TOLERANCE)


def _http_x(x: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_requested_outputs_lengths_and_version(
    client: triton.InferenceServerClient, endpoints: Endpoints
) -> None:
    x = np.random.default_rng(1).normal(size=(2, 6, 2)).astype(np.float32)
    lengths = triton.InferInput("lengths", [2], "INT64")
    lengths.set_data_from_numpy(np.array([6, 3], dtype=np.int64))
    outputs = [triton.InferRequestedOutput("hn")]
    result = client.infer("tiny", [_x(x), lengths], model_version="1", outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["hn"]
    assert result.as_numpy("y") is None
    assert result.as_numpy("hn").shape == (1, 2, 4)  # version 1: one layer of 4
    full = client.infer("tiny", [_x(x), lengths])
    native = _http_predict(endpoints, [x[0], x[1, :3]])
    np.testing.assert_allclose(full.as_numpy("y")[1, :3], native["outputs"][1], atol=TOLERANCE)
    assert np.all(full.as_numpy("y")[1, 3:] == 0)


def test_typed_contents_and_uint64_ids_with_the_generated_stubs(endpoints: Endpoints) -> None:
    """A client built from the protos (not tritonclient): typed ``contents`` and a uint64 id."""
    x = np.random.default_rng(2).normal(size=(1, 3, 2)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="tiny", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3, 2])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.parameters["sequence_id"].uint64_param = (1 << 64) - 1
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True
    with grpc.insecure_channel(endpoints.grpc) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=WAIT_S)
    assert response.id == "typed"
    assert response.parameters["sequence_id"].uint64_param == (1 << 64) - 1
    assert response.parameters["step_count"].int64_param == 3
    y = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(
        list(response.outputs[0].shape)
    )
    native = _http_predict(endpoints, [x[0]])
    np.testing.assert_allclose(y[0], native["outputs"][0], atol=TOLERANCE)


# -- sequences --------------------------------------------------------------------------------


@pytest.mark.parametrize("sequence_id", [42, "sensor-7"], ids=["uint64", "string"])
def test_a_sequence_over_unary_calls_continues_over_http(
    client: triton.InferenceServerClient, endpoints: Endpoints, sequence_id: int | str
) -> None:
    """gRPC and HTTP share one table of sequences: a sequence may move between them."""
    series = np.random.default_rng(3).normal(size=(7, 2)).astype(np.float32)
    first = client.infer(
        "tiny", [_x(series[None, :3])], sequence_id=sequence_id, sequence_start=True
    )
    second = client.infer("tiny", [_x(series[None, 3:5])], sequence_id=sequence_id)
    assert second.get_response(as_json=True)["parameters"]["step_count"] == {"int64_param": "5"}
    http = triton_http.InferenceServerClient(endpoints.http.removeprefix("http://"))
    last = http.infer("tiny", [_http_x(series[None, 5:])], sequence_id=sequence_id)
    http.close()
    got = np.concatenate([r.as_numpy("y")[0] for r in (first, second, last)])
    np.testing.assert_allclose(
        got, _http_predict(endpoints, [series])["outputs"][0], atol=TOLERANCE
    )


def _interleaved(
    ids: list[int | str], rng: np.random.Generator
) -> tuple[dict[int | str, list[np.ndarray]], list[tuple[int | str, int]]]:
    """Each sequence's chunks, and a random order of (sequence, chunk) that keeps each in order."""
    chunks = {}
    for sequence_id in ids:
        series = rng.normal(size=(int(rng.integers(5, 13)), 2)).astype(np.float32)
        cuts = sorted(rng.choice(np.arange(1, len(series)), size=3, replace=False))
        chunks[sequence_id] = np.split(series, cuts)
    remaining = {sequence_id: 0 for sequence_id in ids}
    order = []
    while remaining:
        sequence_id = list(remaining)[int(rng.integers(len(remaining)))]
        order.append((sequence_id, remaining[sequence_id]))
        remaining[sequence_id] += 1
        if remaining[sequence_id] == len(chunks[sequence_id]):
            del remaining[sequence_id]
    return chunks, order


def test_many_interleaved_sequences_on_one_stream(
    client: triton.InferenceServerClient, endpoints: Endpoints
) -> None:
    rng = np.random.default_rng(4)
    ids: list[int | str] = [1000 + i for i in range(12)] + [f"sensor-{i}" for i in range(12)]
    chunks, order = _interleaved(ids, rng)
    answers = Answers()
    client.start_stream(callback=answers)
    for sequence_id, k in order:
        client.async_stream_infer(
            "tiny",
            [_x(chunks[sequence_id][k][None])],
            request_id=f"{sequence_id}/{k}",
            sequence_id=sequence_id,
            sequence_start=k == 0,
            sequence_end=k == len(chunks[sequence_id]) - 1,
            outputs=_y_only(),
        )
    got: dict[int | str, list[np.ndarray]] = {sequence_id: [] for sequence_id in ids}
    for result, error in answers.take(len(order)):
        assert error is None, error
        response = result.get_response(as_json=True)
        name, k = response["id"].rsplit("/", 1)
        sequence_id = int(name) if name.isdigit() else name
        assert int(k) == len(got[sequence_id]), "a sequence was answered out of order"
        got[sequence_id].append(result.as_numpy("y")[0])
        echoed = response["parameters"]["sequence_id"]
        assert echoed == ({"int64_param": name} if name.isdigit() else {"string_param": name})
    client.stop_stream()
    for sequence_id in ids:
        expected = _http_steps(endpoints, chunks[sequence_id])
        np.testing.assert_allclose(np.concatenate(got[sequence_id]), expected, atol=TOLERANCE)


def test_stream_errors_are_answers_and_the_stream_goes_on(
    client: triton.InferenceServerClient, endpoints: Endpoints
) -> None:
    series = np.random.default_rng(5).normal(size=(6, 2)).astype(np.float32)
    nan = np.array([[[np.nan, 1.0]]], dtype=np.float32)
    wrong = np.ones((1, 1, 3), dtype=np.float32)
    answers = Answers()
    client.start_stream(callback=answers)
    send = client.async_stream_infer
    send("tiny", [_x(series[None, :2])], request_id="a", sequence_id=1, sequence_start=True)
    send("nope", [_x(series[None, :1])], request_id="unknown-model")
    send("tiny", [_x(series[None, :1])], request_id="no-start", sequence_id=99)
    send("tiny", [_x(nan)], request_id="nan", sequence_id=1)  # rejected: the state stays
    send("tiny", [_x(wrong)], request_id="features")
    send("tiny", [_x(series[None, 2:4])], request_id="b", sequence_id=1)
    send("tiny", [_x(series[None, 4:])], request_id="c", sequence_id=1, sequence_end=True)
    results, messages = {}, []
    for result, error in answers.take(7):
        if error is None:
            results[result.get_response().id] = result.as_numpy("y")[0]
        else:
            messages.append(error.message())
    client.stop_stream()
    assert list(results) == ["a", "b", "c"]  # one sequence: answered in order
    got = np.concatenate([results[k] for k in "abc"])
    np.testing.assert_allclose(
        got, _http_predict(endpoints, [series])["outputs"][0], atol=TOLERANCE
    )
    http = triton_http.InferenceServerClient(endpoints.http.removeprefix("http://"))
    expected = [
        _http_error(lambda: http.infer("nope", [_http_x(series[None, :1])])),
        _http_error(lambda: http.infer("tiny", [_http_x(series[None, :1])], sequence_id=99)),
        _http_error(lambda: http.infer("tiny", [_http_x(nan)], sequence_id=5, sequence_start=True)),
        _http_error(lambda: http.infer("tiny", [_http_x(wrong)])),
    ]
    http.close()
    assert sorted(messages) == sorted(expected)  # HTTP's wording, word for word


def _http_error(call: Callable[[], Any]) -> str:
    return str(_error(call).message())


class Gated:
    """A fake inference: requests whose id starts with ``slow`` wait for ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0  # requests inside the inference right now

    async def __call__(
        self, name: str, version: int | None, request: Any, caller: str | None
    ) -> InferResult:
        self.running += 1
        try:
            if (request.id or "").startswith("slow"):
                await self.gate.wait()
            y = np.zeros((1, 1, 1), dtype=np.float32)
            return InferResult(SimpleNamespace(version=1), {}, [("y", y)])  # type: ignore[arg-type]
        finally:
            self.running -= 1


def _request(request_id: str, sequence_id: int = 0) -> dict[str, Any]:
    return {
        "model_name": "tiny",
        "inputs": [_x(np.ones((1, 1, 2)))],
        "request_id": request_id,
        "sequence_id": sequence_id,
    }


async def _next_id(answers: Any) -> str:
    result, error = await anext(answers)
    assert error is None, error
    return str(result.get_response().id)


async def test_a_slow_sequence_holds_back_only_its_own_requests(fake_server: Any) -> None:
    gated = Gated()
    client = await fake_server(gated)
    sent = [_request("slow-1", 1), _request("fast-2", 2), _request("after-1", 1), _request("x")]

    async def requests() -> Any:
        for request in sent:
            yield request
        await asyncio.sleep(WAIT_S)  # keep the stream open while the answers arrive

    answers = client.stream_infer(requests())
    async with asyncio.timeout(WAIT_S):
        first = [await _next_id(answers) for _ in range(2)]
        assert sorted(first) == ["fast-2", "x"]  # sequence 1 waits for its slow request
        gated.gate.set()
        assert [await _next_id(answers) for _ in range(2)] == ["slow-1", "after-1"]  # in order
    answers.cancel()
    await client.close()


async def test_a_stream_reads_at_most_its_bound_ahead(
    fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.grpc.stream.MAX_IN_FLIGHT", 8)
    gated = Gated()
    client = await fake_server(gated)

    async def requests() -> Any:
        for i in range(20):
            yield _request(f"slow-{i}", sequence_id=100 + i)  # 20 sequences, all blocked
        await asyncio.sleep(WAIT_S)

    answers = client.stream_infer(requests())
    async with asyncio.timeout(WAIT_S):
        while gated.running < 8:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert gated.running == 8  # the other 12 were not read
        gated.gate.set()
        ids = [await _next_id(answers) for _ in range(20)]
    assert sorted(ids) == sorted(f"slow-{i}" for i in range(20))
    answers.cancel()
    await client.close()


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "shape", "options", "code"),
    [
        pytest.param("nope", (1, 1, 2), {}, "NOT_FOUND", id="unknown-model"),
        pytest.param("tiny", (1, 1, 2), {"model_version": "9"}, "NOT_FOUND", id="unknown-version"),
        pytest.param("tiny", (1, 1, 3), {}, "INVALID_ARGUMENT", id="features"),
        pytest.param("tiny", (1, 1, 2), {"output": "z"}, "INVALID_ARGUMENT", id="unknown-output"),
        pytest.param("tiny", (1, 100, 2), {}, "INVALID_ARGUMENT", id="chunk-over-the-limit"),
        pytest.param("tiny", (1, 1, 2), {"sequence_id": 1234}, "INVALID_ARGUMENT", id="no-start"),
        pytest.param(
            "tiny",
            (2, 1, 2),
            {"sequence_id": 3, "sequence_start": True},
            "INVALID_ARGUMENT",
            id="sequence-batch",
        ),
    ],
)
def test_errors_have_a_status_and_https_message(
    client: triton.InferenceServerClient,
    endpoints: Endpoints,
    model: str,
    shape: tuple[int, ...],
    options: dict[str, Any],
    code: str,
) -> None:
    x = np.ones(shape, dtype=np.float32)
    output = options.pop("output", None)
    over_grpc = [triton.InferRequestedOutput(output)] if output else None
    error = _error(lambda: client.infer(model, [_x(x)], outputs=over_grpc, **options))
    http = triton_http.InferenceServerClient(endpoints.http.removeprefix("http://"))
    over_http = [triton_http.InferRequestedOutput(output)] if output else None
    expected = _error(lambda: http.infer(model, [_http_x(x)], outputs=over_http, **options))
    http.close()
    assert error.status() == f"StatusCode.{code}"
    assert error.message() == expected.message()


@pytest.mark.parametrize("rank", [9, 70])
def test_a_shape_of_too_many_dimensions_is_refused_as_over_http(
    endpoints: Endpoints, rank: int
) -> None:
    """Past numpy's 64 dimensions a reshape would raise: the shape is checked first."""
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="x", datatype="FP32", shape=[1] * rank)
    request.raw_input_contents.append(np.zeros(1, "<f4").tobytes())
    with grpc.insecure_channel(endpoints.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=WAIT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"input 'x': 'shape' has {rank} dimensions; at most 8"


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        pytest.param(
            lambda c: c.get_model_metadata("tiny", "latest"),
            "INVALID_ARGUMENT",
            "model version must be an integer, got 'latest'",
            id="version-not-a-number",
        ),
        pytest.param(
            lambda c: c.infer("tiny", [_x(np.ones((1, 10_000, 2)))]),
            "RESOURCE_EXHAUSTED",
            "Received message larger than max (80",  # gRPC's own check of max_request_bytes
            id="message-over-max-request-bytes",
        ),
    ],
)
def test_grpc_only_errors(
    client: triton.InferenceServerClient, call: Callable[[Any], Any], code: str, message: str
) -> None:
    error = _error(lambda: call(client))
    assert error.status() == f"StatusCode.{code}"
    assert message in error.message()


def test_the_session_limit_is_resource_exhausted(make_endpoints: Callable[..., Endpoints]) -> None:
    endpoints = make_endpoints(max_sessions=1)
    client = triton.InferenceServerClient(endpoints.grpc)
    x = _x(np.ones((1, 1, 2)))
    client.infer("tiny", [x], sequence_id=1, sequence_start=True)
    error = _error(lambda: client.infer("tiny", [x], sequence_id=2, sequence_start=True))
    client.close()
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert error.message() == "too many sessions: the limit of 1 open sessions is reached"


ERRORS = [
    pytest.param(errors.BadRequest("bad"), "INVALID_ARGUMENT", id="400"),
    pytest.param(errors.Unauthorized("no key"), "UNAUTHENTICATED", id="401"),
    pytest.param(errors.ModelNotFound("m", ["tiny"]), "NOT_FOUND", id="404"),
    pytest.param(errors.SessionTakenOver("abc"), "ABORTED", id="409"),
    pytest.param(errors.ChunkTooLarge("'x'", 9, 8), "INVALID_ARGUMENT", id="413"),
    pytest.param(errors.InvalidInput("wrong shape"), "INVALID_ARGUMENT", id="422"),
    pytest.param(errors.InferenceFailed("m", 1, "boom"), "INTERNAL", id="500"),
    pytest.param(errors.NotReady(), "UNAVAILABLE", id="503-not-ready"),
    pytest.param(errors.QueueFull("m", 1, 9), "UNAVAILABLE", id="503-queue-full"),
    pytest.param(StoreUnavailable("redis", "down"), "UNAVAILABLE", id="503-store"),
    pytest.param(errors.SessionLimitReached(5), "RESOURCE_EXHAUSTED", id="503-sessions"),
]


class _Quota(errors.ServiceError):
    status_code = 429  # as a per-key session quota


class _Late(errors.ServiceError):
    status_code = 408  # as a request body that did not arrive in time


ERRORS += [
    pytest.param(_Quota("this key holds 3 sessions"), "RESOURCE_EXHAUSTED", id="429"),
    pytest.param(_Late("too slow"), "DEADLINE_EXCEEDED", id="408"),
]


@pytest.fixture
async def fake_server(tmp_path: Path) -> Any:
    """``start(infer)``: a gRPC server in this loop whose inference is ``infer``; its client."""
    servers = []

    async def start(infer: Callable[..., Any]) -> triton_aio.InferenceServerClient:
        settings = Settings(models_dir=tmp_path, grpc_port=0)
        server = grpc.aio.server()
        servicer = InferenceServicer(None, infer, settings, "test")  # type: ignore[arg-type]
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        servers.append(server)
        return triton_aio.InferenceServerClient(f"{HOST}:{port}")

    yield start
    for server in servers:
        await server.stop(None)


@pytest.fixture
async def failing(fake_server: Any) -> Any:
    """A fake server whose inference raises the exception put in ``raised["next"]``."""
    raised: dict[str, Exception] = {}

    async def infer(*_: Any) -> Any:
        raise raised.pop("next")

    client = await fake_server(infer)
    yield raised, client
    await client.close()


@pytest.mark.parametrize(("exc", "code"), ERRORS)
async def test_every_service_error_has_its_status(failing: Any, exc: Exception, code: str) -> None:
    raised, client = failing
    raised["next"] = exc
    with pytest.raises(InferenceServerException) as info:
        await client.infer("tiny", [_x(np.ones((1, 1, 2)))], client_timeout=WAIT_S)
    assert info.value.status() == f"StatusCode.{code}"
    assert info.value.message() == str(exc)


async def test_an_unexpected_error_is_internal_and_the_stream_goes_on(failing: Any) -> None:
    raised, client = failing

    async def requests() -> Any:
        for exc in (RuntimeError("secret detail"), errors.QueueFull("tiny", 2, 9)):
            raised["next"] = exc
            yield {"model_name": "tiny", "inputs": [_x(np.ones((1, 1, 2)))]}
            await asyncio.sleep(0.05)  # one at a time: the fake has one error slot

    answers = [error async for _, error in client.stream_infer(requests())]
    assert [str(e.message()) for e in answers if e is not None] == [
        "internal error: RuntimeError",
        "model 'tiny' version 2 is overloaded: 9 chunks already queued",
    ]


# -- API keys ---------------------------------------------------------------------------------


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_keys_guard_every_rpc_but_health(make_endpoints: Callable[..., Endpoints]) -> None:
    endpoints = make_endpoints(api_keys=["key-a", "key-b"])
    client = triton.InferenceServerClient(endpoints.grpc)
    assert client.is_server_live() and client.is_server_ready()  # health needs no key
    x = [_x(np.ones((1, 1, 2)))]
    missing = _error(lambda: client.infer("tiny", x))
    wrong = _error(lambda: client.get_model_metadata("tiny", headers=_bearer("key-c")))
    malformed = _error(lambda: client.is_model_ready("tiny", headers={"authorization": "k"}))
    for error in (missing, wrong, malformed):
        assert error.status() == "StatusCode.UNAUTHENTICATED"
    assert missing.message() == (
        "unauthorized: this service needs an API key: send 'Authorization: Bearer <key>'"
    )
    assert wrong.message() == "unauthorized: the API key is not valid"
    assert client.is_model_ready("tiny", headers=_bearer("key-b"))
    answers = Answers()
    client.start_stream(callback=answers)  # no key: the whole stream is refused at once
    [(result, error)] = answers.take(1)
    assert result is None and error is not None
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException, match="no longer in valid state"):
        client.async_stream_infer("tiny", x)
    client.stop_stream()
    client.close()


def test_sequences_are_scoped_per_key(make_endpoints: Callable[..., Endpoints]) -> None:
    endpoints = make_endpoints(api_keys=["key-a", "key-b"])
    rng = np.random.default_rng(6)
    series = {key: rng.normal(size=(4, 2)).astype(np.float32) for key in ("key-a", "key-b")}
    streams = {key: triton.InferenceServerClient(endpoints.grpc) for key in series}
    answers = {key: Answers() for key in series}
    for key, client in streams.items():  # the same sequence id under two keys
        client.start_stream(callback=answers[key], headers=_bearer(key))
        for k in range(4):
            client.async_stream_infer(
                "tiny", [_x(series[key][None, k : k + 1])], sequence_id=7, sequence_start=k == 0
            )
    for key, client in streams.items():
        got = [result.as_numpy("y")[0] for result, error in answers[key].take(4) if error is None]
        expected = _http_steps(endpoints, list(series[key][:, None]), key=key)
        np.testing.assert_allclose(np.concatenate(got), expected, atol=TOLERANCE)
        client.stop_stream()
    unknown = _error(
        lambda: streams["key-b"].infer(
            "tiny", [_x(series["key-a"][None, :1])], sequence_id=8, headers=_bearer("key-b")
        )
    )
    assert unknown.status() == "StatusCode.INVALID_ARGUMENT" and "START" in unknown.message()
    for client in streams.values():
        client.close()


# -- the server's life ------------------------------------------------------------------------


def test_grpc_port_defaults_to_8001_and_zero_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RNNSERVE_GRPC_PORT")  # tests/conftest.py turns gRPC off for the run
    assert Settings(models_dir=tmp_path).grpc_port == 8001
    monkeypatch.setenv("RNNSERVE_GRPC_PORT", "0")
    assert settings_from_args(["--models-dir", str(tmp_path)]).grpc_port == 0
    flagged = settings_from_args(["--models-dir", str(tmp_path), "--grpc-port", "9001"])
    assert flagged.grpc_port == 9001
    with pytest.raises(ValidationError, match="must differ from port"):
        Settings(models_dir=tmp_path, port=9000, grpc_port=9000)
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        Settings(models_dir=tmp_path, grpc_port=70000)


def test_the_grpc_server_runs_in_uvicorns_uvloop(endpoints: Endpoints) -> None:
    loop = endpoints.live.server.servers[0].get_loop()
    assert type(loop).__module__.startswith("uvloop")
    with grpc.insecure_channel(endpoints.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT_S).live


def test_shutdown_answers_what_a_stream_sent_then_ends_it(
    make_endpoints: Callable[..., Endpoints],
) -> None:
    endpoints = make_endpoints()
    client = triton.InferenceServerClient(endpoints.grpc)
    answers = Answers()
    client.start_stream(callback=answers)
    client.async_stream_infer(
        "tiny", [_x(np.ones((1, 2, 2)))], request_id="before", sequence_id=3, sequence_start=True
    )
    [(result, error)] = answers.take(1)
    assert error is None and result.get_response().id == "before"
    endpoints.live.stop()
    assert not endpoints.live.thread.is_alive(), "the server did not stop"
    [(result, error)] = answers.take(1)
    assert result is None and error is not None
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "shutting down" in error.message()
    client.stop_stream()
    client.close()


@contextlib.contextmanager
def _taken(port: int) -> Iterator[None]:
    """Hold ``port`` on the loopback interface (if another process holds it, it is taken too)."""
    with socket.socket() as sock:
        with contextlib.suppress(OSError):
            sock.bind((HOST, port))
            sock.listen()
        yield


async def test_a_taken_default_port_leaves_grpc_off_with_a_warning(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("RNNSERVE_GRPC_PORT")  # tests/conftest.py turns gRPC off for the run
    settings = Settings(models_dir=models_dir, host=HOST)
    assert settings.grpc_port == 8001 and "grpc_port" not in settings.model_fields_set
    app = create_app(settings)
    with _taken(8001), caplog.at_level(logging.WARNING, logger="service.grpc.server"):
        async with app.router.lifespan_context(app):
            pass
    assert f"cannot serve gRPC on {HOST}:8001" in caplog.text
    assert "serving without gRPC" in caplog.text


async def test_a_taken_port_stops_the_startup_with_a_clear_message(models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = create_app(Settings(models_dir=models_dir, host=HOST, grpc_port=port))
        with pytest.raises(GrpcPortUnavailable, match=f"cannot serve gRPC on {HOST}:{port}"):
            async with app.router.lifespan_context(app):
                pass
