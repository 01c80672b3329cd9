"""Session states kept where the model runs: ONNX Runtime OrtValues driven through IOBinding.

On CUDA the pool never leaves the GPU. One batch is one ONNX Runtime call of a *fused step graph*
built at load time around the model's own graph::

    pool (capacity, S, L, m), slots (B,) --Gather--> h0, c0 (L, B, m)   --model--> y, hn, cn
    hn, cn --Concat/Transpose--> (B, S, L, m) --ScatterND at slots--> pool_out (capacity, S, L, m)

``pool_out`` is bound (IOBinding) to the very OrtValue bound as ``pool``. ONNX Runtime's ScatterND
copies its input to its output only when the two buffers differ (CPU and CUDA kernels alike), so
the scatter writes the B new states in place and the rest of the pool is not touched. With
``in_place=False`` the output goes to a second buffer instead and the two swap after each call
(double buffering): every call then also copies the whole pool, which the GPU benchmark measures.

The scatter is the last node of the graph and depends on every model output, so a call that fails
fails before it writes: the pool is unchanged and the batcher can retry the batch in halves. Rows
whose outputs or new states are not finite (NaN, inf) are not written either: the graph computes
``ok`` per row (``sum(v * 0) == 0`` over the row's y and new states, exact: ``v * 0`` is 0 for every
finite ``v`` and NaN otherwise) and scatters ``Where(ok, new, old)``; ``step`` reports ``ok``.

**Buckets and CUDA graphs.** A CUDA graph replays recorded kernels on fixed buffers, so it needs
fixed shapes, fixed addresses and no host work inside the call (ONNX Runtime refuses to capture a
graph with control flow or with nodes left on the CPU). With ``buckets`` (e.g. 1, 8, 64, 512,
4,096), single-step batches (T = 1) run on one fixed-shape graph per bucket: the batch is padded
to the smallest bucket that holds it, padded rows read and write a scratch slot that no session
owns, the model's Scan loops are inlined (one step is one iteration), and every input and output
is an OrtValue bound once and updated in place. On CUDA each bucket's session is created with
``enable_cuda_graph`` and captured at load; on the CPU the same padded graphs run without capture
(which is how they are tested). The pool is then allocated once at ``max_slots`` plus the scratch
slot and never moves. A model whose bucket graphs cannot be built or captured logs one line and
runs every batch on the plain path; so do batches of more than one step or above the largest
bucket.

Thread model: ``acquire``, ``release`` and ``reset`` run on the event loop and only do bookkeeping
(a released slot is queued for zeroing; growth is a wanted capacity). Every device operation runs
under one lock and first applies that bookkeeping (``_sync``), so a zeroing can never be lost to a
batch in flight and a batch never sees a stale slot. The one exception: the lazy ``states()`` of a
bucketed step reads its slots from the pool without that lock (the bucket's own output buffer is
overwritten by the next call); the caller holds those sessions, so no batch in flight writes them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.engine.fixed_step import FixedCall, FixedStepError, static_model
from service.engine.runtime import CPU, ProviderList, session_options
from service.engine.state_pool import FloatArray, SlotAllocator, SlotArray, SlotBookkeeping

logger = logging.getLogger(__name__)

PREFIX = "rnnserve_pool."
POOL, SLOTS, POOL_OUT = f"{PREFIX}pool", f"{PREFIX}slots", f"{PREFIX}pool_out"
UPDATES, STATES, EXTRA = f"{PREFIX}updates", f"{PREFIX}states", f"{PREFIX}extra"
OK, GATHERED, NEW = f"{PREFIX}ok", f"{PREFIX}gathered", f"{PREFIX}new"
ZERO = f"{PREFIX}zero"
MIN_OPSET = 13  # Unsqueeze with axes as an input
DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_BUCKETS = (1, 8, 64, 512, 4096)
CAPTURE_RUNS = 3  # runs per bucket at load: ONNX Runtime warms up, then captures the CUDA graph
BoolArray = npt.NDArray[np.bool_]


class DevicePoolError(Exception):
    """The model or the device cannot host a device-resident state pool; the message says why."""


@dataclass(frozen=True)
class StateLayout:
    """Names and sizes of a model's recurrent state, as metadata.json declares them."""

    state_inputs: tuple[str, ...]  # ("h0",) or ("h0", "c0")
    state_outputs: tuple[str, ...]  # ("hn",) or ("hn", "cn")
    num_layers: int  # L
    hidden_size: int  # m

    @property
    def num_states(self) -> int:  # S
        return len(self.state_inputs)

    def slot_shape(self) -> tuple[int, int, int]:
        return (self.num_states, self.num_layers, self.hidden_size)


@dataclass(frozen=True)
class DeviceRunOutput:
    """Outputs of one fused step: ``y`` (B, T, o) and ``ok`` (B,) on the host, states on the device.

    ``states()`` copies the batch's new states (S, L, B, m) to the host on first use only. Rows
    with ``ok`` False had a non-finite output or new state and were not written to the pool.
    """

    y: FloatArray
    states: Callable[[], FloatArray]
    ok: BoolArray = field(default_factory=lambda: np.ones(0, np.bool_))


# -- graphs -----------------------------------------------------------------------------------


def _pool_value(name: str, layout: StateLayout) -> onnx.ValueInfoProto:
    dims: list[str | int] = ["capacity", *layout.slot_shape()]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _states_value(layout: StateLayout) -> onnx.ValueInfoProto:
    dims: list[str | int] = [layout.num_states, layout.num_layers, "batch", layout.hidden_size]
    return helper.make_tensor_value_info(STATES, TensorProto.FLOAT, dims)


def _slots_value() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch"])


def _const(name: str, values: Sequence[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values))
    return helper.make_node("Constant", [], [name], value=tensor)


def _gather_nodes(layout: StateLayout) -> list[onnx.NodeProto]:
    """pool, slots -> GATHERED (B, S, L, m) and one (L, B, m) tensor per state input."""
    by_state = f"{PREFIX}by_state"
    nodes = [
        helper.make_node("Gather", [POOL, SLOTS], [GATHERED], axis=0),  # (B, S, L, m)
        helper.make_node("Transpose", [GATHERED], [by_state], perm=[1, 2, 0, 3]),  # (S, L, B, m)
    ]
    for k, name in enumerate(layout.state_inputs):
        index = f"{PREFIX}index{k}"
        scalar = helper.make_tensor(index, TensorProto.INT64, [], [k])
        nodes.append(helper.make_node("Constant", [], [index], value=scalar))
        nodes.append(helper.make_node("Gather", [by_state, index], [name], axis=0))  # (L, B, m)
    return nodes


def _scatter_nodes(updates: str) -> list[onnx.NodeProto]:
    """pool, slots, updates (B, S, L, m) -> pool_out with the B slots replaced."""
    axes, indices = f"{PREFIX}axes1", f"{PREFIX}indices"
    return [
        _const(axes, [1]),
        helper.make_node("Unsqueeze", [SLOTS, axes], [indices]),  # (B, 1)
        helper.make_node("ScatterND", [POOL, indices, updates], [POOL_OUT]),
    ]


def _stack_nodes(layout: StateLayout) -> list[onnx.NodeProto]:
    """hn, cn (L, B, m) -> STATES (S, L, B, m) and the new slots (B, S, L, m)."""
    axes0 = f"{PREFIX}axes0"
    nodes = [_const(axes0, [0])]
    stacked = []
    for k, name in enumerate(layout.state_outputs):
        stacked.append(f"{PREFIX}stacked{k}")
        nodes.append(helper.make_node("Unsqueeze", [name, axes0], [stacked[-1]]))  # (1, L, B, m)
    nodes.append(helper.make_node("Concat", stacked, [STATES], axis=0))  # (S, L, B, m)
    nodes.append(helper.make_node("Transpose", [STATES], [NEW], perm=[2, 0, 1, 3]))
    return nodes


def _times_zero_sum(value: str, axes: Sequence[int], out: str) -> list[onnx.NodeProto]:
    """value (B, ...) -> out (B,): the row's sum of ``v * 0``, 0 if finite and NaN if not."""
    times_zero, axes_name = f"{value}.times_zero", f"{value}.axes"
    return [
        helper.make_node("Mul", [value, ZERO], [times_zero]),  # 0, or NaN for inf and NaN
        _const(axes_name, axes),
        helper.make_node("ReduceSum", [times_zero, axes_name], [out], keepdims=0),  # (B,)
    ]


def _keep_finite_nodes() -> list[onnx.NodeProto]:
    """y (B, T, o), NEW (B, S, L, m), GATHERED -> OK (B,) and UPDATES: NEW where OK, else old."""
    y_rows, new_rows, both = f"{PREFIX}y_rows", f"{PREFIX}new_rows", f"{PREFIX}both_rows"
    axes, ok4 = f"{PREFIX}axes123", f"{PREFIX}ok4"
    zero = helper.make_tensor(ZERO, TensorProto.FLOAT, [], [0.0])
    return [
        helper.make_node("Constant", [], [ZERO], value=zero),
        *_times_zero_sum("y", [1, 2], y_rows),
        *_times_zero_sum(NEW, [1, 2, 3], new_rows),
        helper.make_node("Add", [y_rows, new_rows], [both]),  # (B,)
        helper.make_node("Equal", [both, ZERO], [OK]),  # (B,) bool
        _const(axes, [1, 2, 3]),
        helper.make_node("Unsqueeze", [OK, axes], [ok4]),  # (B, 1, 1, 1)
        helper.make_node("Where", [ok4, NEW, GATHERED], [UPDATES]),  # (B, S, L, m)
    ]


def fused_step_model(model: onnx.ModelProto, layout: StateLayout) -> onnx.ModelProto:
    """Wrap ``model`` so it reads its states from a pool and scatters the new ones back into it.

    Inputs: the model's ``x`` and ``lengths``, ``POOL`` (capacity, S, L, m), ``SLOTS`` (B,).
    Outputs: ``y``, ``POOL_OUT`` (the updated pool), ``STATES`` (S, L, B, m, as the model
    computed them) and ``OK`` (B,): whether the row was finite and so written.
    """
    graph = model.graph
    _check_fusable(model, layout)
    inputs = [v for v in graph.input if v.name not in layout.state_inputs]
    outputs = [v for v in graph.output if v.name == "y"]
    new_outputs = [
        _pool_value(POOL_OUT, layout),
        _states_value(layout),
        helper.make_tensor_value_info(OK, TensorProto.BOOL, ["batch"]),
    ]
    nodes = [*_gather_nodes(layout), *graph.node, *_stack_nodes(layout), *_keep_finite_nodes()]
    fused = helper.make_graph(
        [*nodes, *_scatter_nodes(UPDATES)],
        f"{graph.name}_pooled",
        [*inputs, _pool_value(POOL, layout), _slots_value()],
        [*outputs, *new_outputs],
        initializer=list(graph.initializer),
        value_info=list(graph.value_info),
    )
    return helper.make_model(
        fused, opset_imports=list(model.opset_import), ir_version=model.ir_version
    )


def _check_fusable(model: onnx.ModelProto, layout: StateLayout) -> None:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise DevicePoolError(f"device pool needs opset >= {MIN_OPSET}, the model has {opset}")
    names = {v.name for v in (*model.graph.input, *model.graph.output)}
    names |= {out for node in model.graph.node for out in node.output}
    clashing = sorted(n for n in names if n.startswith(PREFIX))
    if clashing:
        raise DevicePoolError(f"graph names {clashing} clash with the pool's prefix {PREFIX!r}")
    missing = set(layout.state_inputs) | set(layout.state_outputs) | {"x", "lengths", "y"}
    missing -= names
    if missing:
        raise DevicePoolError(f"the model has no graph value(s) {sorted(missing)}")


def _opset_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    # IR 8 pairs with opset 17 and loads in every ONNX Runtime that the service supports.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def scatter_model(layout: StateLayout) -> onnx.ModelProto:
    """pool, slots (B,), updates (B, S, L, m) -> pool_out: writes whole slots."""
    updates = helper.make_tensor_value_info(
        UPDATES, TensorProto.FLOAT, ["batch", *layout.slot_shape()]
    )
    graph = helper.make_graph(
        _scatter_nodes(UPDATES),
        "pool_scatter",
        [_pool_value(POOL, layout), _slots_value(), updates],
        [_pool_value(POOL_OUT, layout)],
    )
    return _opset_model(graph)


def gather_model(layout: StateLayout) -> onnx.ModelProto:
    """pool, slots (B,) -> states (S, L, B, m)."""
    gathered = f"{PREFIX}gathered"
    nodes = [
        helper.make_node("Gather", [POOL, SLOTS], [gathered], axis=0),  # (B, S, L, m)
        helper.make_node("Transpose", [gathered], [STATES], perm=[1, 2, 0, 3]),  # (S, L, B, m)
    ]
    states = _states_value(layout)
    graph = helper.make_graph(
        nodes, "pool_gather", [_pool_value(POOL, layout), _slots_value()], [states]
    )
    return _opset_model(graph)


def grow_model(layout: StateLayout) -> onnx.ModelProto:
    """pool, extra (1,) -> pool_out with ``extra`` zeroed slots appended."""
    head, tail, pads = f"{PREFIX}pads_head", f"{PREFIX}pads_tail", f"{PREFIX}pads"
    nodes = [
        _const(head, [0, 0, 0, 0]),  # nothing before any axis
        _const(tail, [0, 0, 0]),
        helper.make_node("Concat", [head, EXTRA, tail], [pads], axis=0),  # extra after axis 0
        helper.make_node("Pad", [POOL, pads], [POOL_OUT], mode="constant"),
    ]
    extra = helper.make_tensor_value_info(EXTRA, TensorProto.INT64, [1])
    graph = helper.make_graph(
        nodes, "pool_grow", [_pool_value(POOL, layout), extra], [_pool_value(POOL_OUT, layout)]
    )
    return _opset_model(graph)


# -- the pool ---------------------------------------------------------------------------------


def buckets_up_to(max_batch_size: int, sizes: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets a batcher of ``max_batch_size`` can fill: those below it and the next one up."""
    ordered = sorted(sizes)
    kept = [size for size in ordered if size < max_batch_size]
    return (*kept, *[size for size in ordered if size >= max_batch_size][:1])


def _session(model: onnx.ModelProto, providers: ProviderList, threads: int) -> ort.InferenceSession:
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    options = session_options(threads, on_cpu=first == CPU)
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


class DevicePool(SlotBookkeeping):
    """States of all sessions of one model version, resident on ``device`` ("cpu" or "cuda").

    The same five methods as ``StatePool`` (``acquire``, ``release``, ``reset``, ``gather``,
    ``scatter``; the last two copy to and from the host and exist for inspection and tests) plus
    ``step``, which runs one batch of the model on states that stay on the device. The pool is a
    tensor (capacity, S, L, m): one slot's S * L * m floats are contiguous. Capacity doubles when
    full, up to ``max_slots``; new slots are zero. With ``buckets``, single-step batches run on
    fixed-shape graphs (captured as CUDA graphs on CUDA; see the module's docstring) and the pool
    is allocated at once: ``max_slots`` plus one scratch slot for padded rows.
    """

    def __init__(
        self,
        model: onnx.ModelProto | Path,
        layout: StateLayout,
        *,
        max_slots: int,
        device: str = "cpu",
        device_id: int = 0,
        initial_capacity: int = 1024,
        in_place: bool = True,
        intra_op_threads: int = 0,
        provider_options: dict[str, str] | None = None,
        buckets: Sequence[int] = (),
    ) -> None:
        if device not in DEVICES:
            raise DevicePoolError(f"device must be one of {sorted(DEVICES)}, not {device!r}")
        if buckets and not in_place:
            raise DevicePoolError("buckets need an in-place pool: a captured graph cannot swap")
        if isinstance(model, Path):
            model = onnx.load(str(model))
        self.layout = layout
        self.device = device
        self.in_place = in_place
        self._device_id = device_id
        self._provider_options = dict(provider_options or {})
        providers: ProviderList = [(DEVICES[device], self._provider_options)]
        if device != "cpu":
            providers.append("CPUExecutionProvider")  # shape arithmetic runs on the host
        fused = fused_step_model(model, layout)
        self._step = _session(fused, providers, intra_op_threads)
        self._gather = _session(gather_model(layout), providers, 1)
        self._scatter = _session(scatter_model(layout), providers, 1)
        self._grow = _session(grow_model(layout), providers, 1)
        self.provider = self._step.get_providers()[0]
        if self.provider != DEVICES[device]:
            raise DevicePoolError(
                f"{DEVICES[device]} is not available (running on {self.provider})"
            )
        # wanted capacity; the device catches up in _sync. With buckets: all slots at once.
        self._capacity = max_slots if buckets else min(initial_capacity, max_slots)
        self._scratch = max_slots if buckets else None  # the slot padded rows use
        self._pool = self._zeros(self._capacity + (1 if buckets else 0))
        self._spare = None if in_place else self._empty(self._capacity)
        self._slots = SlotAllocator(max_slots)
        self._to_zero: list[int] = []  # released or reset slots, zeroed before the next device op
        self._book = threading.Lock()  # bookkeeping, held for microseconds
        self._device_lock = threading.Lock()  # device work, held for a whole call
        self._buckets: dict[int, FixedCall] = {}
        self._input_size = _fixed_dim(fused.graph.input, "x", 2)  # n
        if buckets:
            self._buckets = self._fixed_steps(fused, sorted(set(buckets)), intra_op_threads)

    @property
    def buckets(self) -> tuple[int, ...]:
        """Batch sizes single steps are padded to; empty: every batch takes the plain path."""
        return tuple(self._buckets)

    def _fixed_steps(
        self, fused: onnx.ModelProto, sizes: list[int], threads: int
    ) -> dict[int, FixedCall]:
        """One fixed-shape step per bucket, run (and on CUDA captured) at once; {} if impossible."""
        options = dict(self._provider_options)
        if self.device == "cuda":
            options["enable_cuda_graph"] = "1"
        providers: ProviderList = [(DEVICES[self.device], options)]
        empty_x = np.zeros((0, 1, self._input_size), np.float32)
        empty = np.zeros(0, np.int64)
        try:
            steps = {size: self._fixed_step(fused, size, providers, threads) for size in sizes}
            for size, step in steps.items():
                for _ in range(CAPTURE_RUNS):  # every row padding: only the scratch slot changes
                    step(self._bucket_feeds(size, empty_x, empty, empty), [OK])
        except (FixedStepError, DevicePoolError, RuntimeError, ValueError) as exc:
            # ONNX Runtime's errors derive from RuntimeError; one line, then the plain path
            logger.warning("fixed-shape step graphs off, every batch takes the plain path: %s", exc)
            return {}
        return steps

    def _fixed_step(
        self, fused: onnx.ModelProto, size: int, providers: ProviderList, threads: int
    ) -> FixedCall:
        lay = self.layout
        pool = [self._device_capacity(), *lay.slot_shape()]
        dims = {
            "x": [size, 1, self._input_size],
            "lengths": [size],
            POOL: pool,
            SLOTS: [size],
            "y": [size, 1, _fixed_dim(fused.graph.output, "y", 2)],
            POOL_OUT: pool,
            STATES: [lay.num_states, lay.num_layers, size, lay.hidden_size],
            OK: [size],
        }
        model = static_model(fused, dims, f"{PREFIX}b{size}.")
        session = _session(model, providers, threads)
        if session.get_providers()[0] != DEVICES[self.device]:
            raise DevicePoolError(f"bucket {size} runs on {session.get_providers()[0]}")
        shared = {POOL: self._pool, POOL_OUT: self._pool}
        return FixedCall(session, model, self.device, self._device_id, shared)

    def _bucket_feeds(
        self, size: int, x: FloatArray, lengths: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """x (B, 1, n), lengths and slots (B,) padded to ``size`` rows on the scratch slot."""
        assert self._scratch is not None
        rows = len(slots)
        padded_x = np.zeros((size, 1, self._input_size), np.float32)  # (size, 1, n)
        padded_x[:rows] = x
        padded_lengths = np.ones(size, np.int64)
        padded_lengths[:rows] = lengths
        padded_slots = np.full(size, self._scratch, np.int64)
        padded_slots[:rows] = slots
        return {"x": padded_x, "lengths": padded_lengths, SLOTS: padded_slots}

    # -- bookkeeping (event loop) --------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        buffers = 1 if self.in_place else 2
        slots = self._capacity + (0 if self._scratch is None else 1)
        return buffers * slots * 4 * int(np.prod(self.layout.slot_shape()))

    def acquire(self) -> int:
        """Hand out a zeroed slot; raise ``SessionLimitReached`` when ``max_slots`` are in use."""
        with self._book:
            slot = self._slots.take()
            if slot == self._capacity:
                self._capacity = min(self._capacity * 2, self.max_slots)
            return slot

    def release(self, slot: int) -> None:
        """Return a slot to the free list; it is zeroed before the next device operation."""
        with self._book:
            self._to_zero.append(slot)
            self._slots.give_back(slot)

    def reset(self, slot: int) -> None:
        with self._book:
            self._to_zero.append(slot)

    # -- device work (any thread) --------------------------------------------------------------

    def step(
        self, x: FloatArray, lengths: npt.NDArray[np.int64], slots: SlotArray
    ) -> DeviceRunOutput:
        """Run ``x`` (B, T, n) for ``lengths`` (B,) from the states of ``slots`` (B, distinct).

        The new states are written to the slots only if the whole call succeeds, and then only
        for the rows whose outputs and new states are finite (``ok``).
        """
        slot_ids = self._checked_slots(slots)
        with self._device_lock:
            self._sync()
            size = self._bucket_for(x.shape)
            if size:
                try:
                    return self._step_fixed(size, x, lengths, slot_ids)
                except RuntimeError as exc:  # nothing was written: the scatter comes last
                    logger.warning("fixed-shape step failed, taking the plain path: %s", exc)
                    self._buckets = {}
            return self._step_plain(x, lengths, slot_ids)

    def _bucket_for(self, shape: tuple[int, ...]) -> int | None:
        """The smallest bucket holding a single-step batch of ``shape`` (B, T, n), if any."""
        if shape[1] != 1:
            return None
        return next((size for size in self._buckets if size >= shape[0]), None)

    def _step_fixed(
        self, size: int, x: FloatArray, lengths: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]
    ) -> DeviceRunOutput:
        rows = len(slots)
        feeds = self._bucket_feeds(size, x, lengths, slots)
        y, ok = self._buckets[size](feeds, ["y", OK])
        # The bucket's states buffer is overwritten by its next call: read the pool instead.
        states = _once(lambda: self._gather_rows(slots))
        y_rows = y[:rows].astype(np.float32, copy=False)  # (B, 1, o)
        return DeviceRunOutput(y=y_rows, states=states, ok=ok[:rows].astype(np.bool_, copy=False))

    def _step_plain(
        self, x: FloatArray, lengths: npt.NDArray[np.int64], slots: npt.NDArray[np.int64]
    ) -> DeviceRunOutput:
        binding = self._step.io_binding()
        binding.bind_cpu_input("x", np.ascontiguousarray(x, dtype=np.float32))
        binding.bind_cpu_input("lengths", np.ascontiguousarray(lengths, dtype=np.int64))
        binding.bind_cpu_input(SLOTS, slots)
        binding.bind_output("y", "cpu")
        binding.bind_output(STATES, self.device, self._device_id)
        binding.bind_output(OK, "cpu")
        self._run_on_pool(self._step, binding)
        y, states, ok = binding.get_outputs()[:3]  # in the order bound
        return DeviceRunOutput(y=y.numpy(), states=_once(states.numpy), ok=ok.numpy())

    def gather(self, slots: SlotArray) -> FloatArray:
        """Copy the states of ``slots`` (B,) to a new host array (S, L, B, m)."""
        slot_ids = self._checked_slots(slots)
        with self._device_lock:
            self._sync()
            return self._gather_rows(slot_ids)

    def _gather_rows(self, slots: npt.NDArray[np.int64]) -> FloatArray:
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input(POOL, self._pool)
        binding.bind_cpu_input(SLOTS, slots)
        binding.bind_output(STATES, "cpu")
        self._gather.run_with_iobinding(binding)
        states: FloatArray = binding.get_outputs()[0].numpy()
        return states

    def scatter(self, slots: SlotArray, states: FloatArray) -> None:
        """Write host ``states`` (S, L, B, m) into ``slots`` (B,), which must be distinct."""
        slot_ids = self._checked_slots(slots)
        updates = np.ascontiguousarray(np.transpose(states, (2, 0, 1, 3)), dtype=np.float32)
        with self._device_lock:
            self._sync()
            self._write_slots(slot_ids, updates)

    # -- internals -----------------------------------------------------------------------------

    def _checked_slots(self, slots: SlotArray) -> npt.NDArray[np.int64]:
        slot_ids = np.ascontiguousarray(slots, dtype=np.int64)  # (B,)
        if slot_ids.ndim != 1 or not slot_ids.size:
            raise ValueError(f"slots must be a non-empty vector, got shape {slot_ids.shape}")
        handed_out = self._slots.handed_out
        if slot_ids.min() < 0 or slot_ids.max() >= handed_out:
            raise ValueError(f"slots must lie in [0, {handed_out}) (the slots handed out)")
        return slot_ids

    def _sync(self) -> None:
        """Apply growth and pending zeroing on the device (caller holds the device lock)."""
        with self._book:
            wanted, to_zero, self._to_zero = self._capacity, self._to_zero, []
        if wanted > self._device_capacity():
            self._grow_to(wanted)
        if to_zero:
            slots = np.unique(np.array(to_zero, dtype=np.int64))  # (K,)
            zeros = np.zeros((len(slots), *self.layout.slot_shape()), np.float32)  # (K, S, L, m)
            self._write_slots(slots, zeros)

    def _device_capacity(self) -> int:
        return int(self._pool.shape()[0])

    def _write_slots(self, slots: npt.NDArray[np.int64], updates: FloatArray) -> None:
        binding = self._scatter.io_binding()
        binding.bind_cpu_input(SLOTS, slots)
        binding.bind_cpu_input(UPDATES, updates)
        self._run_on_pool(self._scatter, binding)

    def _run_on_pool(self, session: ort.InferenceSession, binding: ort.IOBinding) -> None:
        """Run with the pool bound as input and output: in place, or into the spare and swap."""
        target = self._pool if self._spare is None else self._spare
        binding.bind_ortvalue_input(POOL, self._pool)
        binding.bind_ortvalue_output(POOL_OUT, target)
        session.run_with_iobinding(binding)
        if self._spare is not None:
            self._pool, self._spare = self._spare, self._pool

    def _grow_to(self, capacity: int) -> None:
        grown = self._empty(capacity)
        binding = self._grow.io_binding()
        binding.bind_ortvalue_input(POOL, self._pool)
        binding.bind_cpu_input(EXTRA, np.array([capacity - self._device_capacity()], np.int64))
        binding.bind_ortvalue_output(POOL_OUT, grown)
        self._grow.run_with_iobinding(binding)
        self._pool = grown
        if self._spare is not None:
            self._spare = self._empty(capacity)

    def _empty(self, capacity: int) -> ort.OrtValue:
        shape = [capacity, *self.layout.slot_shape()]
        return ort.OrtValue.ortvalue_from_shape_and_type(
            shape, np.float32, self.device, self._device_id
        )

    def _zeros(self, capacity: int) -> ort.OrtValue:
        # On the CPU the OrtValue shares the array: untouched zero pages cost no resident memory.
        zeros = np.zeros((capacity, *self.layout.slot_shape()), np.float32)
        return ort.OrtValue.ortvalue_from_numpy(zeros, self.device, self._device_id)


def _fixed_dim(values: Sequence[onnx.ValueInfoProto], name: str, axis: int) -> int:
    """The fixed size of axis ``axis`` of graph value ``name`` (e.g. x's number of features)."""
    value = next(v for v in values if v.name == name)
    dims = value.type.tensor_type.shape.dim
    if len(dims) <= axis or not dims[axis].HasField("dim_value"):
        raise DevicePoolError(f"{name} needs a fixed size on axis {axis}")
    return int(dims[axis].dim_value)


def _once(fetch: Callable[[], FloatArray]) -> Callable[[], FloatArray]:
    """A function returning what ``fetch`` returns, calling it at most once."""
    cache: list[FloatArray] = []

    def fetch_once() -> FloatArray:
        if not cache:
            cache.append(fetch())
        return cache[0]

    return fetch_once
