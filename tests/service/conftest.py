"""Fixtures for the service tests: tiny ONNX models on disk, apps, clients and a live server.

Test modules get everything through fixtures (``--import-mode=importlib`` cannot import this
file) and import its classes for type annotations only. The model here is built with
``onnx.helper`` (a stack of native ONNX GRU ops with ``sequence_lens``), so most service tests
need neither torch nor the exporter;
``test_exported_models.py`` checks the service against models written by ``training.export``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import uvicorn
from fastapi import FastAPI
from loopback import free_port
from onnx import TensorProto, helper, numpy_helper

from service.app import create_app
from service.settings import Settings

with warnings.catch_warnings():
    # Starlette asks for httpx2 instead of httpx with a UserWarning at import time.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

INPUT_SIZE = 2
OUTPUT_SIZE = 1


@dataclass(frozen=True)
class TinyGRU:
    """Weights of a stacked GRU (ONNX layout, linear_before_reset=1) and a numpy reference."""

    weights: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # W (3m, n), R (3m, m), B (6m,)
    head: tuple[np.ndarray, np.ndarray]  # (m, o), (o,)

    @property
    def input_size(self) -> int:
        return int(self.weights[0][0].shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.weights[0][1].shape[1])

    def run(self, x: np.ndarray, h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reference: x (T, n), h0 (L, m) -> y (T, o), hn (L, m), in float64."""
        m, layers = self.hidden_size, len(self.weights)
        h = np.zeros((layers, m)) if h0 is None else np.array(h0, dtype=np.float64)
        seq = np.asarray(x, dtype=np.float64)
        for layer, (w, r, b) in enumerate(self.weights):
            outputs = []
            for x_t in seq:
                gx, gh = w @ x_t + b[: 3 * m], r @ h[layer] + b[3 * m :]
                z = 1 / (1 + np.exp(-(gx[:m] + gh[:m])))
                reset = 1 / (1 + np.exp(-(gx[m : 2 * m] + gh[m : 2 * m])))
                cand = np.tanh(gx[2 * m :] + reset * gh[2 * m :])
                h[layer] = (1 - z) * cand + z * h[layer]
                outputs.append(h[layer].copy())
            seq = np.array(outputs)
        return seq @ self.head[0] + self.head[1], h


def make_tiny_gru(hidden_size: int, num_layers: int, seed: int) -> TinyGRU:
    rng = np.random.default_rng(seed)
    m, weights = hidden_size, []
    for layer in range(num_layers):
        n = INPUT_SIZE if layer == 0 else m
        weights.append(
            (
                rng.normal(0, 0.5, (3 * m, n)).astype(np.float32),
                rng.normal(0, 0.5, (3 * m, m)).astype(np.float32),
                rng.normal(0, 0.1, (6 * m,)).astype(np.float32),
            )
        )
    head = (
        rng.normal(0, 0.5, (m, OUTPUT_SIZE)).astype(np.float32),
        rng.normal(0, 0.1, (OUTPUT_SIZE,)).astype(np.float32),
    )
    return TinyGRU(weights, head)


def gru_graph(model: TinyGRU) -> onnx.ModelProto:
    """x (B, T, n), h0 (L, B, m), lengths (B,) -> y (B, T, o) masked past lengths, hn (L, B, m)."""
    m, layers = model.hidden_size, len(model.weights)
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(model.head[0], "head_w"),
        numpy_helper.from_array(model.head[1], "head_b"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbn"], perm=[1, 0, 2]),
        helper.make_node("Cast", ["lengths"], ["lens32"], to=TensorProto.INT32),
    ]
    seq, finals = "x_tbn", []
    for layer, (w, r, b) in enumerate(model.weights):
        inits += [
            numpy_helper.from_array(w[None], f"W{layer}"),
            numpy_helper.from_array(r[None], f"R{layer}"),
            numpy_helper.from_array(b[None], f"B{layer}"),
            numpy_helper.from_array(np.array([layer], np.int64), f"start{layer}"),
            numpy_helper.from_array(np.array([layer + 1], np.int64), f"end{layer}"),
        ]
        nodes += [
            helper.make_node(
                "Slice", ["h0", f"start{layer}", f"end{layer}", "axis0"], [f"h0_layer{layer}"]
            ),
            helper.make_node(
                "GRU",
                [seq, f"W{layer}", f"R{layer}", f"B{layer}", "lens32", f"h0_layer{layer}"],
                [f"Y{layer}", f"hn{layer}"],
                hidden_size=m,
                linear_before_reset=1,
            ),
            helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [f"seq{layer}"]),
        ]
        seq = f"seq{layer}"
        finals.append(f"hn{layer}")
    nodes += [
        helper.make_node("Concat", finals, ["hn"], axis=0),
        helper.make_node("Transpose", [seq], ["h_btm"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["h_btm", "head_w"], ["proj"]),
        helper.make_node("Add", ["proj", "head_b"], ["y_raw"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "one"], ["steps"], axis=0),
        helper.make_node("Range", ["zero", "steps", "one"], ["t"]),
        helper.make_node("Unsqueeze", ["t", "axis0"], ["t_row"]),
        helper.make_node("Unsqueeze", ["lengths", "axis1"], ["len_col"]),
        helper.make_node("Less", ["t_row", "len_col"], ["valid"]),
        helper.make_node("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["valid_f", "axis2"], ["mask"]),
        helper.make_node("Mul", ["y_raw", "mask"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-gru",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", INPUT_SIZE]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [layers, "B", m]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", OUTPUT_SIZE]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [layers, "B", m]),
        ],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def write_model(models_dir: Path, name: str, version: int, model: TinyGRU) -> Path:
    """Write ``models_dir/name/version/{model.onnx, metadata.json}``; return the folder."""
    folder = models_dir / name / str(version)
    folder.mkdir(parents=True)
    data = gru_graph(model).SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    metadata = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "cell": "gru",
        "graph": "native",
        "num_layers": len(model.weights),
        "hidden_size": model.hidden_size,
        "input_size": INPUT_SIZE,
        "output_size": OUTPUT_SIZE,
        "head": "regression",
        "state_inputs": ["h0"],
        "state_outputs": ["hn"],
        "feature_names": ["a", "b"],
        "output_names": ["y"],
        "task": {"name": "test", "description": "a random tiny GRU"},
        "normalization": {},
        "training": {},
        "opset": 17,
        "sha256": hashlib.sha256(data).hexdigest(),
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture(scope="session")
def tiny() -> TinyGRU:
    """The default model ``tiny`` version 2: 2 layers, hidden 8."""
    return make_tiny_gru(hidden_size=8, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_v1() -> TinyGRU:
    return make_tiny_gru(hidden_size=4, num_layers=1, seed=1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny: TinyGRU, tiny_v1: TinyGRU) -> Path:
    """``tiny`` versions 1 and 2 (2 is the default)."""
    root = tmp_path_factory.mktemp("models")
    write_model(root, "tiny", 1, tiny_v1)
    write_model(root, "tiny", 2, tiny)
    return root


def make_settings(models_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "models_dir": models_dir,
        "providers": ["CPUExecutionProvider"],
        "max_steps_per_chunk": 64,
        "max_request_bytes": 64 * 1024,
        "max_sessions": 1000,
        **overrides,
    }
    return Settings(**values)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 20
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.01)


@pytest.fixture
def make_client(models_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """Build a running app (lifespan started, models loaded) with setting overrides."""
    clients: list[TestClient] = []

    def build(wait_until_ready: bool = True, **overrides: Any) -> TestClient:
        folder = overrides.pop("models_dir", models_dir)
        client = TestClient(create_app(make_settings(folder, **overrides)))
        client.__enter__()
        clients.append(client)
        if wait_until_ready:
            wait_ready(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def new_model() -> Callable[..., TinyGRU]:
    """``new_model(hidden_size, num_layers, seed)``: a random tiny GRU."""
    return make_tiny_gru


@pytest.fixture
def add_model() -> Callable[[Path, str, int, TinyGRU], Path]:
    """``add_model(models_dir, name, version, model)``: write a model folder, return it."""
    return write_model


@pytest.fixture
def unused_port() -> int:
    return free_port()


class LiveServer:
    """A real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws_max_size=settings.max_request_bytes,
            ws_ping_interval=settings.ws_ping_interval_s,
            ws_ping_timeout=settings.ws_ping_interval_s,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def start(self) -> None:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the live server did not become ready"
            try:
                if httpx.get(self.http_url + "/health/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def make_server(models_dir: Path) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def build(**overrides: Any) -> LiveServer:
        settings = make_settings(models_dir, **overrides)
        server = LiveServer(create_app(settings), settings)
        server.start()
        servers.append(server)
        return server

    yield build
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    return make_server()
