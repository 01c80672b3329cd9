"""The device-resident state pool, on the CPU execution provider (the same class runs on CUDA)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.engine import device_pool
from service.engine.batcher import Batcher
from service.engine.device_pool import (
    POOL,
    POOL_OUT,
    SLOTS,
    STATES,
    DevicePool,
    DevicePoolError,
    StateLayout,
    fused_step_model,
)
from service.engine.errors import SessionLimitReached
from service.engine.fixed_step import FixedStepError, static_model
from service.engine.registry import read_model_dir
from service.engine.runtime import ModelRuntime
from service.engine.state_pool import StatePool

if TYPE_CHECKING:
    from conftest import TestClient, TinyGRU

GRU_LAYOUT = StateLayout(("h0",), ("hn",), num_layers=2, hidden_size=8)  # the ``tiny`` model
PAIR_LAYOUT = StateLayout(("h0", "c0"), ("hn", "cn"), num_layers=2, hidden_size=3)
DOUBLING_LAYOUT = StateLayout(("h0",), ("hn",), num_layers=1, hidden_size=2)
FEATURES = 2
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "co2-forecaster" / "1"  # exported by training: GRU as a Scan loop


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


def doubling_model() -> onnx.ModelProto:
    """hn = 2 * h0 (overflows from 2e38 on), y = x: a cell whose rows go non-finite on demand."""
    state = [1, "B", DOUBLING_LAYOUT.hidden_size]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["h0", "two"], ["hn"]),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        "doubling",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 1]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, state),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["B"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 1]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, state),
        ],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def shipped_layout() -> StateLayout:
    meta = json.loads((SHIPPED / "metadata.json").read_text())
    states = (tuple(meta["state_inputs"]), tuple(meta["state_outputs"]))
    return StateLayout(*states, meta["num_layers"], meta["hidden_size"])


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


# -- non-finite rows ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buckets", [pytest.param((), id="plain"), pytest.param((1, 4), id="fixed-shape")]
)
def test_rows_that_go_non_finite_are_reported_and_not_written(buckets: tuple[int, ...]) -> None:
    pool = make_pool(doubling_model(), DOUBLING_LAYOUT, max_slots=8, buckets=buckets)
    slots = np.array([pool.acquire() for _ in range(4)])
    before = np.array([3e38, 1.0, 2.0, 3.0], np.float32)[None, None, :, None].repeat(2, axis=3)
    pool.scatter(slots, before)  # (S, L, B, m): slot 0 overflows when doubled
    x = np.array([1.0, np.nan, 5.0, np.inf], np.float32)[:, None, None]  # (B, 1, 1)
    out = pool.step(x, np.ones(4, np.int64), slots)
    np.testing.assert_array_equal(out.ok, [False, False, True, False])
    after = pool.gather(slots)
    np.testing.assert_array_equal(after[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])  # untouched
    np.testing.assert_array_equal(after[:, :, 2], 2 * before[:, :, 2])
    np.testing.assert_array_equal(pool.step(x[2:3], np.ones(1, np.int64), slots[2:3]).ok, [True])


# -- fixed-shape single steps (CUDA graphs on CUDA, padding only on the CPU) ----------------------


def steps_twice(
    model: onnx.ModelProto | Path, layout: StateLayout, buckets: tuple[int, ...], sizes: list[int]
) -> tuple[DevicePool, DevicePool]:
    """The same random single-step batches through a plain pool and a bucketed one."""
    plain = make_pool(model, layout, max_slots=48, initial_capacity=48)
    bucketed = make_pool(model, layout, max_slots=48, buckets=buckets)
    assert bucketed.buckets == buckets
    features = _fixed_features(model)
    for pool in (plain, bucketed):
        for _ in range(40):
            pool.acquire()
    rng = np.random.default_rng(5)
    for size in sizes:
        slots = rng.choice(40, size, replace=False).astype(np.intp)
        x = rng.standard_normal((size, 1, features)).astype(np.float32)
        expected = plain.step(x, np.ones(size, np.int64), slots)
        got = bucketed.step(x, np.ones(size, np.int64), slots)
        np.testing.assert_array_equal(got.y, expected.y)
        np.testing.assert_array_equal(got.ok, expected.ok)
        np.testing.assert_array_equal(got.states(), expected.states())
    return plain, bucketed


def _fixed_features(model: onnx.ModelProto | Path) -> int:
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    x = next(v for v in proto.graph.input if v.name == "x")
    return int(x.type.tensor_type.shape.dim[2].dim_value)


@pytest.mark.parametrize(
    ("model", "layout"),
    [
        pytest.param("tiny", GRU_LAYOUT, id="native-gru-op"),
        pytest.param(SHIPPED / "model.onnx", None, id="exported-scan"),
        pytest.param("pair", PAIR_LAYOUT, id="two-states"),
    ],
)
def test_padded_single_steps_equal_the_plain_path_exactly(
    tiny_onnx: Path, model: Any, layout: StateLayout | None
) -> None:
    model = {"tiny": tiny_onnx, "pair": pair_model()}.get(model, model)
    layout = layout or shipped_layout()
    plain, bucketed = steps_twice(model, layout, (1, 8, 32), [1, 3, 8, 9, 32, 1, 17])
    everyone = np.arange(40)  # every session slot, stepped or not, matches
    np.testing.assert_array_equal(bucketed.gather(everyone), plain.gather(everyone))


def test_padding_touches_only_the_scratch_slot(tiny_onnx: Path) -> None:
    pool = make_pool(tiny_onnx, GRU_LAYOUT, max_slots=10, buckets=(8,))
    slots = np.array([pool.acquire() for _ in range(10)])
    states = np.random.default_rng(6).standard_normal((1, 2, 10, 8)).astype(np.float32)
    pool.scatter(slots, states)
    pool.step(np.ones((2, 1, FEATURES), np.float32), np.ones(2, np.int64), slots[[3, 7]])
    after = pool.gather(slots)
    untouched = [s for s in range(10) if s not in (3, 7)]
    np.testing.assert_array_equal(after[:, :, untouched], states[:, :, untouched])
    assert not np.array_equal(after[:, :, [3, 7]], states[:, :, [3, 7]])
    assert pool.capacity == 10  # allocated once: 10 slots and the scratch slot, never grown
    assert pool.nbytes == 11 * 2 * 8 * 4
    with pytest.raises(ValueError, match="slots must lie in"):
        pool.gather(np.array([10]))  # the scratch slot is nobody's


def test_multi_step_and_oversized_batches_take_the_plain_path(tiny_onnx: Path) -> None:
    plain = make_pool(tiny_onnx, GRU_LAYOUT, max_slots=16, initial_capacity=16)
    bucketed = make_pool(tiny_onnx, GRU_LAYOUT, max_slots=16, buckets=(1, 4))
    for pool in (plain, bucketed):
        for _ in range(12):
            pool.acquire()
    rng = np.random.default_rng(7)
    for batch, steps in ((3, 4), (9, 1), (4, 1)):
        slots = rng.choice(12, batch, replace=False).astype(np.intp)
        x = rng.standard_normal((batch, steps, FEATURES)).astype(np.float32)
        lengths = rng.integers(1, steps + 1, batch).astype(np.int64)
        expected, got = plain.step(x, lengths, slots), bucketed.step(x, lengths, slots)
        np.testing.assert_array_equal(got.y, expected.y)
    np.testing.assert_array_equal(bucketed.gather(np.arange(12)), plain.gather(np.arange(12)))


def test_fixed_step_graphs_hold_no_loop_and_no_shape_arithmetic(tmp_path: Path) -> None:
    """What CUDA graph capture needs: ONNX Runtime folds every Shape, and no Scan is left."""
    layout = shipped_layout()
    fused = fused_step_model(onnx.load(str(SHIPPED / "model.onnx")), layout)
    pool = [9, *layout.slot_shape()]
    states = [layout.num_states, layout.num_layers, 4, layout.hidden_size]
    dims = {
        "x": [4, 1, 1],
        "lengths": [4],
        POOL: pool,
        SLOTS: [4],
        "y": [4, 1, 1],
        POOL_OUT: pool,
        STATES: states,
        device_pool.OK: [4],
    }
    fixed = static_model(fused, dims, "rnnserve_pool.b4.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(fixed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"Scan", "Loop", "If", "Shape", "Range", "Constant"}, ops
    with pytest.raises(FixedStepError, match="does not check"):
        static_model(fused, dims | {"x": [4, 2, 1], "y": [4, 2, 1]}, "p.")  # two steps: refused


def test_a_model_without_fixed_step_graphs_falls_back_in_one_line(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object) -> onnx.ModelProto:
        raise FixedStepError("the graph has a Loop node ('loop')")

    monkeypatch.setattr(device_pool, "static_model", refuse)
    with caplog.at_level(logging.WARNING, logger="service.engine.device_pool"):
        pool = make_pool(tiny_onnx, GRU_LAYOUT, buckets=(1, 8))
    assert pool.buckets == ()
    assert [r.getMessage() for r in caplog.records] == [
        "fixed-shape step graphs off, every batch takes the plain path: "
        "the graph has a Loop node ('loop')"
    ]
    pool.acquire()
    assert pool.step(np.ones((1, 1, FEATURES), np.float32), np.ones(1, np.int64), [0]).ok.all()


def test_buckets_need_an_in_place_pool(tiny_onnx: Path) -> None:
    with pytest.raises(DevicePoolError, match="in-place"):
        make_pool(tiny_onnx, GRU_LAYOUT, buckets=(1,), in_place=False)


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [
        pytest.param(1, (1,), id="one"),
        pytest.param(256, (1, 8, 64, 512), id="default-batcher"),
        pytest.param(512, (1, 8, 64, 512), id="on-a-bucket"),
        pytest.param(65_536, (1, 8, 64, 512, 4096), id="beyond-the-largest"),
    ],
)
def test_buckets_stop_at_the_first_that_holds_a_full_batch(
    max_batch_size: int, expected: tuple[int, ...]
) -> None:
    assert device_pool.buckets_up_to(max_batch_size) == expected
