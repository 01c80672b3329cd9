"""The device-resident state pool, on the CPU execution provider (the same class runs on CUDA)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.engine.batcher import Batcher
from service.engine.device_pool import (
    DevicePool,
    DevicePoolError,
    StateLayout,
    fused_step_model,
)
from service.engine.errors import SessionLimitReached
from service.engine.registry import read_model_dir
from service.engine.runtime import ModelRuntime
from service.engine.state_pool import StatePool

if TYPE_CHECKING:
    from conftest import TestClient, TinyGRU

GRU_LAYOUT = StateLayout(("h0",), ("hn",), num_layers=2, hidden_size=8)  # the ``tiny`` model
PAIR_LAYOUT = StateLayout(("h0", "c0"), ("hn", "cn"), num_layers=2, hidden_size=3)
FEATURES = 2


@pytest.fixture
def tiny_onnx(models_dir: Path) -> Path:
    return models_dir / "tiny" / "2" / "model.onnx"


def pair_model() -> onnx.ModelProto:
    """A two-state toy cell: s = sum of x over valid steps; hn = tanh(h0 + s); cn = c0 + hn."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["steps"], axis=0),
        helper.make_node("Range", ["zero", "steps", "one"], ["t"]),
        helper.make_node("Unsqueeze", ["lengths", "axis1"], ["len_col"]),
        helper.make_node("Less", ["t", "len_col"], ["valid"]),  # (B, T)
        helper.make_node("Cast", ["valid"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),  # (B, T, 1)
        helper.make_node("Mul", ["x", "mask3"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "axes12"], ["s"], keepdims=0),  # (B,)
        helper.make_node("Unsqueeze", ["s", "axes02"], ["s3"]),  # (1, B, 1)
        helper.make_node("Add", ["h0", "s3"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["hn"]),
        helper.make_node("Add", ["c0", "hn"], ["cn"]),
        helper.make_node("ReduceSum", ["xm", "axis2"], ["y"], keepdims=1),  # (B, T, 1)
    ]
    ints = {"zero": [0], "one": [1], "axis1": [1], "axis2": [2], "axes12": [1, 2], "axes02": [0, 2]}
    inits = [
        helper.make_tensor(k, TensorProto.INT64, [] if k in ("zero", "one") else [len(v)], v)
        for k, v in ints.items()
    ]
    state = ["L", "B", PAIR_LAYOUT.hidden_size]
    graph = helper.make_graph(
        nodes,
        "pair",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", FEATURES]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 1]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("cn", TensorProto.FLOAT, state),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def pair_reference(
    x: np.ndarray, lengths: np.ndarray, h: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """numpy version of ``pair_model``: x (B, T, n), h and c (L, B, m) -> hn, cn."""
    valid = np.arange(x.shape[1])[None, :] < lengths[:, None]  # (B, T)
    s = (x * valid[:, :, None]).sum(axis=(1, 2))  # (B,)
    hn = np.tanh(h + s[None, :, None])
    return hn, c + hn


def make_pool(model: onnx.ModelProto | Path, layout: StateLayout, **options: object) -> DevicePool:
    settings: dict[str, object] = {"max_slots": 64, "initial_capacity": 4, **options}
    return DevicePool(model, layout, **settings)  # type: ignore[arg-type]


def random_batch(
    rng: np.random.Generator, slots_in_use: int, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    slots = rng.choice(slots_in_use, batch, replace=False).astype(np.intp)  # distinct, any order
    lengths = rng.integers(1, 5, batch).astype(np.int64)
    x = rng.standard_normal((batch, int(lengths.max()), FEATURES)).astype(np.float32)
    return x, lengths, slots


@pytest.mark.parametrize(
    "in_place", [pytest.param(True, id="in-place"), pytest.param(False, id="double-buffered")]
)
def test_steps_equal_the_host_pool_path(tiny_onnx: Path, in_place: bool) -> None:
    device = make_pool(tiny_onnx, GRU_LAYOUT, in_place=in_place)
    host = StatePool(1, 2, 8, max_slots=64)
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    for _ in range(20):
        assert device.acquire() == host.acquire()
    rng = np.random.default_rng(0)
    for _ in range(6):
        x, lengths, slots = random_batch(rng, 20, int(rng.integers(1, 12)))
        out = device.step(x, lengths, slots)
        feeds = {"x": x, "lengths": lengths, "h0": host.gather(slots)[0]}
        y, hn = session.run(["y", "hn"], feeds)
        host.scatter(slots, hn[None])
        np.testing.assert_array_equal(out.y, y)
        np.testing.assert_array_equal(out.states(), hn[None])
    everyone = np.arange(20)
    np.testing.assert_array_equal(device.gather(everyone), host.gather(everyone))


def test_two_states_follow_an_independent_reference() -> None:
    pool = make_pool(pair_model(), PAIR_LAYOUT)
    for _ in range(10):
        pool.acquire()
    h = np.zeros((2, 10, 3))  # (L, slots, m)
    c = np.zeros((2, 10, 3))
    rng = np.random.default_rng(1)
    for _ in range(4):
        x, lengths, slots = random_batch(rng, 10, 6)
        out = pool.step(x, lengths, slots)
        h[:, slots], c[:, slots] = pair_reference(x, lengths, h[:, slots], c[:, slots])
        np.testing.assert_allclose(out.states(), np.stack([h[:, slots], c[:, slots]]), atol=1e-6)
    np.testing.assert_allclose(pool.gather(np.arange(10)), np.stack([h, c]), atol=1e-6)


def test_released_slot_is_reused_and_zeroed(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT)
    slots = np.array([pool.acquire() for _ in range(3)])
    pool.scatter(slots, np.full((1, 2, 3, 8), 5.0, np.float32))
    pool.release(int(slots[1]))
    assert pool.in_use == 2
    again = pool.acquire()
    assert again == slots[1]
    assert not pool.gather(np.array([again])).any()
    np.testing.assert_array_equal(pool.gather(slots[[0, 2]]), 5.0)


def test_reset_zeroes_only_that_slot_before_the_next_step(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT)
    slots = np.array([pool.acquire() for _ in range(2)])
    x = np.ones((2, 3, FEATURES), np.float32)
    lengths = np.array([3, 3], np.int64)
    pool.step(x, lengths, slots)
    pool.reset(int(slots[0]))
    second = pool.step(x, lengths, slots)
    fresh = make_pool(tiny_onnx, GRU_LAYOUT)
    fresh.acquire()
    first = fresh.step(x[:1], lengths[:1], np.array([0]))
    np.testing.assert_array_equal(second.y[0], first.y[0])  # slot 0 started from zero again
    assert not np.array_equal(second.y[1], first.y[0])  # slot 1 kept its state


def test_grows_in_doublings_up_to_max_slots_and_keeps_states(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT, max_slots=20, initial_capacity=4)
    first = np.array([pool.acquire() for _ in range(4)])
    states = np.random.default_rng(2).standard_normal((1, 2, 4, 8)).astype(np.float32)
    pool.scatter(first, states)
    capacities = []
    for _ in range(16):
        pool.acquire()
        capacities.append(pool.capacity)
    assert sorted(set(capacities)) == [8, 16, 20]
    np.testing.assert_array_equal(pool.gather(first), states)
    assert not pool.gather(np.arange(4, 20)).any()
    assert pool.nbytes == 20 * 2 * 8 * 4


def test_full_pool_raises_session_limit(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT, max_slots=3, initial_capacity=2)
    for _ in range(3):
        pool.acquire()
    with pytest.raises(SessionLimitReached):
        pool.acquire()


def test_failed_step_leaves_every_state_unchanged(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT)
    slots = np.array([pool.acquire() for _ in range(3)])
    before = np.random.default_rng(3).standard_normal((1, 2, 3, 8)).astype(np.float32)
    pool.scatter(slots, before)
    wrong_features = np.ones((3, 2, FEATURES + 1), np.float32)
    with pytest.raises(Exception, match="x"):
        pool.step(wrong_features, np.array([2, 2, 2], np.int64), slots)
    np.testing.assert_array_equal(pool.gather(slots), before)


def test_slots_never_handed_out_are_rejected(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT)
    pool.acquire()
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 1\)"):
        pool.gather(np.array([0, 1]))


def test_unknown_device_is_refused(tiny_onnx: Path) -> None:
    with pytest.raises(DevicePoolError, match="device must be one of"):
        make_pool(tiny_onnx, GRU_LAYOUT, device="tpu")


def test_state_names_missing_from_the_graph_are_reported(tiny_onnx: Path) -> None:
    layout = StateLayout(("h0", "c0"), ("hn", "cn"), num_layers=2, hidden_size=8)
    with pytest.raises(DevicePoolError, match=r"no graph value\(s\) \['c0', 'cn'\]"):
        make_pool(tiny_onnx, layout)


def test_fused_graph_is_valid_onnx(tiny_onnx: Path) -> None:
    fused = fused_step_model(onnx.load(str(tiny_onnx)), GRU_LAYOUT)
    onnx.checker.check_model(fused, full_check=True)
    assert [v.name for v in fused.graph.input] == [
        "x",
        "lengths",
        "rnnserve_pool.pool",
        "rnnserve_pool.slots",
    ]


async def test_batcher_on_a_device_pool_equals_sequential_runs(
    models_dir: Path, tiny: TinyGRU
) -> None:
    spec = read_model_dir(models_dir / "tiny" / "2")
    runtime = ModelRuntime(spec, ["CPUExecutionProvider"])
    pool = DevicePool(spec.onnx_path, GRU_LAYOUT, max_slots=100, initial_capacity=4)
    executor = ThreadPoolExecutor(max_workers=2)
    batcher = Batcher(
        runtime, pool, executor, max_batch_size=8, max_delay_s=0.0, max_queue_depth=1000
    )
    batcher.start()
    rng = np.random.default_rng(4)
    streams = [
        [
            rng.standard_normal((int(rng.integers(1, 5)), FEATURES)).astype(np.float32)
            for _ in range(3)
        ]
        for _ in range(12)
    ]
    free = [rng.standard_normal((3, FEATURES)).astype(np.float32) for _ in range(5)]

    async def stream(chunks: list[np.ndarray]) -> np.ndarray:
        slot = pool.acquire()
        return np.concatenate([(await batcher.submit(c, slot=slot)).y for c in chunks])

    async def stateless(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = await batcher.submit(x)
        return result.y, result.state

    try:
        outputs = await asyncio.gather(*map(stream, streams))
        answers = await asyncio.gather(*map(stateless, free), *map(stream, streams[:3]))
    finally:
        await batcher.stop()
        executor.shutdown()
    for chunks, y in zip(streams + streams[:3], [*outputs, *answers[5:]], strict=True):
        np.testing.assert_allclose(y, tiny.run(np.concatenate(chunks))[0], atol=1e-5)
    for x, (y, state) in zip(free, answers[:5], strict=True):
        expected_y, expected_h = tiny.run(x)
        np.testing.assert_allclose(y, expected_y, atol=1e-5)
        np.testing.assert_allclose(state[0], expected_h, atol=1e-5)  # (S, L, m), S = 1
    assert batcher.stats.batches > 0


def test_service_keeps_states_on_the_device_pool(
    make_client: Callable[..., TestClient], tiny: TinyGRU
) -> None:
    client = make_client(state_pool="device")
    (served,) = [m for m in client.app.state.dataplane.served_models() if m.version == 2]
    assert isinstance(served.batcher.pool, DevicePool)
    steps_a = [[0.5, -1.0], [1.5, 0.25]]
    steps_b = [[0.1, 0.2]]

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = client.post(path, json=body)
        assert response.status_code in (200, 201), response.text
        answer: dict[str, Any] = response.json()
        return answer

    first = post("/v1/sessions", {"model": "tiny"})["session_id"]
    second = post("/v1/sessions", {"model": "tiny"})["session_id"]
    post(f"/v1/sessions/{first}/steps", {"inputs": steps_a})
    post(f"/v1/sessions/{second}/steps", {"inputs": steps_b})
    after = post(f"/v1/sessions/{first}/steps", {"inputs": steps_b})["outputs"]
    np.testing.assert_allclose(after, tiny.run(steps_a + steps_b)[0][2:], atol=1e-5)
    post(f"/v1/sessions/{first}/reset", {})
    fresh = post(f"/v1/sessions/{first}/steps", {"inputs": steps_b})["outputs"]
    np.testing.assert_allclose(fresh, tiny.run(steps_b)[0], atol=1e-5)
    assert client.delete(f"/v1/sessions/{second}").status_code == 204
    third = post("/v1/sessions", {"model": "tiny"})["session_id"]  # reuses the freed slot
    reused = post(f"/v1/sessions/{third}/steps", {"inputs": steps_a})["outputs"]
    np.testing.assert_allclose(reused, tiny.run(steps_a)[0], atol=1e-5)


def test_auto_keeps_states_on_the_host_when_the_model_runs_on_the_cpu(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(state_pool="auto", providers=["CPUExecutionProvider"])
    pools = [m.batcher.pool for m in client.app.state.dataplane.served_models()]
    assert pools and all(isinstance(pool, StatePool) for pool in pools)
