"""Triton's model repository extension (index, load, unload), driven by the unmodified
``tritonclient.http`` against a live server on a models folder of the test's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from loopback import HOST, free_port
from model_files import break_sha
from tritonclient.utils import InferenceServerException

if TYPE_CHECKING:
    from conftest import LiveServer, TinyGRU

Start = Callable[..., "LiveServer"]  # the explicit_server fixture
Connect = Callable[["LiveServer"], triton.InferenceServerClient]  # the triton_client fixture

KEY = "key-a"


@pytest.fixture(autouse=True)
def broken_v3(own_models_dir: Path, tiny: TinyGRU, add_model: Callable[..., Path]) -> None:
    """Beside ``tiny`` versions 1 and 2, a version 3 whose sha256 does not match."""
    break_sha(add_model(own_models_dir, "tiny", 3, tiny))


def _error(call: Callable[[], Any]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_the_index_lists_every_version_with_its_state(
    explicit_server: Start,
    triton_client: Connect,
) -> None:
    client = triton_client(explicit_server())
    index = client.get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("tiny", "1", "READY"),
        ("tiny", "2", "READY"),
        ("tiny", "3", "UNAVAILABLE"),
    ]
    assert index[0]["reason"] == ""
    assert "sha256 of model.onnx is" in index[2]["reason"]
    assert "model_repository" in client.get_server_metadata()["extensions"]


def test_the_index_can_list_only_ready_versions(explicit_server: Start) -> None:
    server = explicit_server()
    response = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": True})
    assert response.status_code == 200
    assert [(m["version"], m["state"]) for m in response.json()] == [
        ("1", "READY"),
        ("2", "READY"),
    ]
    bad = httpx.post(f"{server.http_url}/v2/repository/index", json={"ready": "yes"})
    assert bad.status_code == 400 and "'ready' must be true or false" in bad.json()["error"]


def test_unload_then_load_through_tritonclient(
    explicit_server: Start,
    triton_client: Connect,
) -> None:
    server = explicit_server()
    client = triton_client(server)
    client.unload_model("tiny")
    assert not client.is_model_ready("tiny", "1") and not client.is_model_ready("tiny", "2")
    states = {m["version"]: (m["state"], m["reason"]) for m in client.get_model_repository_index()}
    assert states["1"] == ("UNAVAILABLE", "unloaded") and states["2"] == ("UNAVAILABLE", "unloaded")
    assert httpx.get(f"{server.http_url}/health/ready").status_code == 503  # nothing serves
    client.unload_model("tiny")  # unloading what is not loaded does nothing, as in Triton
    error = _error(lambda: client.load_model("tiny"))  # version 3 is still broken
    assert error.status() == "400"
    assert error.message().startswith("failed to load 'tiny': version 3: sha256 of model.onnx")
    assert error.message().endswith("(versions serving: 1, 2)")
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny")
    assert client.is_server_ready()


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        pytest.param("none", "in model control mode 'none'", id="none"),
        pytest.param("poll", "if polling is enabled", id="poll"),
    ],
)
def test_load_and_unload_need_explicit_mode(
    explicit_server: Start,
    triton_client: Connect,
    mode: str,
    words: str,
) -> None:
    client = triton_client(explicit_server(model_control_mode=mode))
    for call in (client.load_model, client.unload_model):
        error = _error(partial(call, "tiny"))
        assert error.status() == "503"
        assert f"explicit model load / unload is not allowed {words}" in error.message()
        assert "--model-control-mode explicit" in error.message()
    assert len(client.get_model_repository_index()) == 3  # the index answers in every mode
    assert client.is_model_ready("tiny", "2")


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        pytest.param(
            lambda c: c.load_model("nope"),
            "404",
            "failed to load 'nope': the models folder has no model 'nope'",
            id="load-unknown",
        ),
        pytest.param(
            lambda c: c.unload_model("nope"),
            "404",
            "failed to unload 'nope': the models folder has no model 'nope'",
            id="unload-unknown",
        ),
        pytest.param(
            lambda c: c.load_model("Tiny"), "400", "'Tiny' is not a valid model name", id="name"
        ),
        pytest.param(
            lambda c: c.load_model("tiny", config='{"max_batch_size": 8}'),
            "400",
            "load parameter 'config' is not supported",
            id="config",
        ),
    ],
)
def test_bad_repository_requests_get_a_clear_error(
    explicit_server: Start,
    triton_client: Connect,
    call: Callable[[triton.InferenceServerClient], Any],
    status: str,
    message: str,
) -> None:
    client = triton_client(explicit_server())
    error = _error(lambda: call(client))
    assert error.status() == status
    assert message in error.message()
    assert client.is_model_ready("tiny", "2")  # nothing changed


def test_api_keys_guard_the_repository_api(
    explicit_server: Start,
    triton_client: Connect,
) -> None:
    client = triton_client(explicit_server(api_keys=[KEY]))
    calls: list[Callable[..., Any]] = [
        client.get_model_repository_index,
        partial(client.load_model, "tiny"),
        partial(client.unload_model, "tiny"),
    ]
    for call in calls:
        assert _error(call).status() == "401"
        assert _error(partial(call, headers=_bearer("wrong"))).status() == "401"
    assert client.is_model_ready("tiny", "2", headers=_bearer(KEY))
    client.unload_model("tiny", headers=_bearer(KEY))
    assert not client.is_model_ready("tiny", "2", headers=_bearer(KEY))
    _error(lambda: client.load_model("tiny", headers=_bearer(KEY)))  # 400: version 3 is broken
    index = client.get_model_repository_index(headers=_bearer(KEY))
    assert [m["state"] for m in index] == ["READY", "READY", "UNAVAILABLE"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def grpc_client(
    explicit_server: Start,
) -> Iterator[Callable[..., triton_grpc.InferenceServerClient]]:
    """``grpc_client(**settings)``: an unmodified ``tritonclient.grpc`` client of a live server
    started by ``explicit_server(**settings)`` with gRPC on a port of its own."""
    clients: list[triton_grpc.InferenceServerClient] = []

    def connect(**settings: Any) -> triton_grpc.InferenceServerClient:
        port = free_port()
        explicit_server(grpc_port=port, **settings)
        clients.append(triton_grpc.InferenceServerClient(f"{HOST}:{port}"))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


def test_the_repository_over_grpc_matches_http(
    grpc_client: Callable[..., triton_grpc.InferenceServerClient],
) -> None:
    client = grpc_client()
    index = client.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("tiny", "1", "READY"),
        ("tiny", "2", "READY"),
        ("tiny", "3", "UNAVAILABLE"),
    ]
    assert "sha256 of model.onnx is" in index[2]["reason"]
    client.unload_model("tiny")
    assert not client.is_model_ready("tiny", "2")
    states = [m["state"] for m in client.get_model_repository_index(as_json=True)["models"]]
    assert states == ["UNAVAILABLE"] * 3
    error = _error(lambda: client.load_model("tiny"))  # version 3 is still broken
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message().startswith("failed to load 'tiny': version 3: sha256 of model.onnx")
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        pytest.param(
            lambda c: c.load_model("nope"),
            "NOT_FOUND",
            "failed to load 'nope': the models folder has no model 'nope'",
            id="load-unknown",
        ),
        pytest.param(
            lambda c: c.unload_model("nope"),
            "NOT_FOUND",
            "failed to unload 'nope': the models folder has no model 'nope'",
            id="unload-unknown",
        ),
        pytest.param(
            lambda c: c.load_model("tiny", config='{"max_batch_size": 8}'),
            "INVALID_ARGUMENT",
            "load parameter 'config' is not supported",
            id="config",
        ),
    ],
)
def test_bad_repository_calls_over_grpc_get_a_clear_error(
    grpc_client: Callable[..., triton_grpc.InferenceServerClient],
    call: Callable[[triton_grpc.InferenceServerClient], Any],
    status: str,
    message: str,
) -> None:
    client = grpc_client()
    error = _error(lambda: call(client))
    assert error.status() == f"StatusCode.{status}"
    assert message in error.message()
    assert client.is_model_ready("tiny", "2")  # nothing changed


def test_grpc_load_needs_explicit_mode_and_a_key(
    grpc_client: Callable[..., triton_grpc.InferenceServerClient],
) -> None:
    client = grpc_client(model_control_mode="poll", api_keys=[KEY])
    assert _error(client.get_model_repository_index).status() == "StatusCode.UNAUTHENTICATED"
    error = _error(lambda: client.unload_model("tiny", headers=_grpc_bearer(KEY)))
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "--model-control-mode explicit" in error.message()
    models = client.get_model_repository_index(headers=_grpc_bearer(KEY), as_json=True)["models"]
    assert len(models) == 3
    assert client.is_model_ready("tiny", "2", headers=_grpc_bearer(KEY))


def _grpc_bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}  # gRPC metadata keys are lower case
