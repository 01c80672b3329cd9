"""Build the ONNX graph of a :class:`training.model.RecurrentModel` by hand, with ``onnx.helper``.

``torch.onnx`` unrolls the time loop and freezes the sequence length, so the graph is written
directly. Two forms, both with dynamic batch and time (see ``docs/reference/model-format.md``):

- ``scan`` (every cell): per layer, the input projection of all steps is one MatMul over
  ``(T, B, n)``, hoisted out of the loop; then one ``Scan`` whose body does one step of the cell and
  keeps the old state where the step lies past the row's length. The graph does not grow with ``T``.
- ``native`` (``gru`` and ``lstm``): the ONNX ``GRU`` (``linear_before_reset=1``) and ``LSTM`` ops.

Both forms are time-major inside. Input normalisation and output de-normalisation are folded into
the first layer's input projection and the head, so the graph takes and returns raw values without
extra nodes: ``W ((x - mu) / s) + b = (W / s) x + (b - W (mu / s))``.

The Scan bodies are kept small because, at small batch, ONNX Runtime's cost is mostly per node
(about 0.5 us each on a 2-core CPU): all gate blocks from ``h`` are one Gemm whose C input is the
step's hoisted projection (so the add is free), weights are stored pre-transposed, the hoisted
projection is split outside the loop, constant gates (``gru3``, ``mgu3``) are folded into the
weights, and the LSTM's gates are reordered so that the three sigmoid gates are contiguous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from training.cells import RecurrentCell
from training.model import ModelConfig, RecurrentModel

OPSET = 17  # supported by every onnxruntime >= 1.14 and by onnx >= 1.12
IR_VERSION = 8  # the IR version that goes with opset 17
GRAPH_FORMS = ("scan", "native")
NATIVE_CELLS = ("gru", "lstm")

Array = np.ndarray


def numpy_of(t: torch.Tensor) -> Array:
    """A parameter or buffer as float64 numpy, so that folding loses nothing before float32."""
    return t.detach().cpu().double().numpy()


def buffer_of(model: RecurrentModel, name: str) -> Array:
    return numpy_of(model.get_buffer(name))


def cells_of(model: RecurrentModel) -> list[RecurrentCell]:
    return [cell for cell in model.cells if isinstance(cell, RecurrentCell)]


class _Builder:
    """Collects nodes and initializers of one ONNX graph; every op returns its output's name."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(
        self, hint: str, value: Array | float | Sequence[int], dtype: type = np.float32
    ) -> str:
        name = self.fresh(hint)
        array: Array = np.asarray(value, dtype=dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        (name,) = self.ops(op_type, *inputs, outs=[out or self.fresh(op_type.lower())], **attrs)
        return name

    def ops(self, op_type: str, *inputs: str, outs: Sequence[str], **attrs: object) -> list[str]:
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), **attrs))  # type: ignore[arg-type]
        return list(outs)

    def split(self, x: str, sizes: Sequence[int], axis: int = -1) -> list[str]:
        if len(sizes) == 1:
            return [x]
        outs = [self.fresh("part") for _ in sizes]
        return self.ops("Split", x, self.const("sizes", sizes, np.int64), outs=outs, axis=axis)


# ---------------------------------------------------------------------------------------------
# Weights: what each layer hoists out of the loop, with the input normalisation folded in.


@dataclass(frozen=True)
class InputNorm:
    """``(x - mean) / std`` as arrays; folded into the first layer's input weights."""

    mean: Array
    std: Array

    def fold(self, weight: Array, bias: Array) -> tuple[Array, Array]:
        """Return ``(W', b')`` with ``W' x + b' == W ((x - mean) / std) + b``; W is ``(k, n)``."""
        return weight / self.std, bias - weight @ (self.mean / self.std)


@dataclass
class Projection:
    """The hoisted input projection ``x @ weight.T + bias``, split into ``blocks`` for the body."""

    weight: Array  # (k m, n)
    bias: Array  # (k m,)
    blocks: list[int] = field(default_factory=list)  # sizes of the scan inputs it is split into


def _rows(t: torch.Tensor | None, start: int, stop: int) -> Array:
    assert t is not None
    return numpy_of(t[start:stop])


# ---------------------------------------------------------------------------------------------
# Scan bodies: one step of each cell. Each takes the state names and the hoisted inputs' names
# and returns the new state names (before masking).

StepBuilder = Callable[[_Builder, RecurrentCell, list[str], list[str]], list[str]]


def _transposed(b: _Builder, hint: str, weight: Array) -> str:
    """A weight ``(k, m)`` stored as ``(m, k)`` so that the body does ``h @ W.T`` in one MatMul."""
    return b.const(hint, np.ascontiguousarray(weight.T))


def _gru_update(b: _Builder, z: str, n: str, h: str) -> str:
    """``(1 - z) n + z h`` as ``n + z (h - n)``: three nodes instead of four."""
    return b.op("Add", n, b.op("Mul", z, b.op("Sub", h, n)))


def _mgu_update(b: _Builder, f: str, n: str, h: str) -> str:
    """``(1 - f) h + f n`` as ``h + f (n - h)``."""
    return b.op("Add", h, b.op("Mul", f, b.op("Sub", n, h)))


def _candidate(b: _Builder, x_n: str, gated_h: str, u_n: Array) -> str:
    """``tanh((g * h) @ U_n.T + x_n)``: the reset-before candidate, one Gemm with ``x_n`` as C."""
    return b.op("Tanh", b.op("Gemm", gated_h, _transposed(b, "u_n", u_n), x_n))


def _step_gru(b: _Builder, cell: RecurrentCell, state: list[str], xs: list[str]) -> list[str]:
    (h,), (x_rz, x_n) = state, xs
    m = cell.hidden_size
    weight_hh = numpy_of(cell.weight_hh)
    # b_hr and b_hz were moved into the hoisted x_rz; b_hn must stay here, inside r * (...).
    rz = b.op("Sigmoid", b.op("Gemm", h, _transposed(b, "u_rz", weight_hh[: 2 * m]), x_rz))
    r, z = b.split(rz, [m, m])  # (B, m) each
    b_hn = b.const("b_hn", _rows(cell.bias_hh, 2 * m, 3 * m))
    h_n = b.op("Gemm", h, _transposed(b, "u_n", weight_hh[2 * m :]), b_hn)
    n = b.op("Tanh", b.op("Add", x_n, b.op("Mul", r, h_n)))
    return [_gru_update(b, z, n, h)]


def _gate_preactivation(b: _Builder, cell: RecurrentCell, h: str, x_g: str | None) -> str:
    """``h @ U_g.T`` plus what sits beside it: the hoisted input (full cells) or a gate bias."""
    m, blocks = cell.hidden_size, cell.hidden_blocks - 1
    u = _transposed(b, "u_g", numpy_of(cell.weight_hh[: blocks * m]))
    if x_g is not None:
        return b.op("Gemm", h, u, x_g)
    if cell.kind in ("gru1", "mgu1"):
        return b.op("Gemm", h, u, b.const("b_g", _rows(cell.bias_ih, 0, blocks * m)))
    return b.op("MatMul", h, u)


def _step_gated_gru(b: _Builder, cell: RecurrentCell, state: list[str], xs: list[str]) -> list[str]:
    """``gru-classic`` (gates see the input), ``gru1`` and ``gru2`` (gates see the state only)."""
    (h,) = state
    x_rz, x_n = xs if len(xs) == 2 else (None, xs[0])
    m = cell.hidden_size
    r, z = b.split(b.op("Sigmoid", _gate_preactivation(b, cell, h, x_rz)), [m, m])
    n = _candidate(b, x_n, b.op("Mul", r, h), numpy_of(cell.weight_hh[2 * m :]))
    return [_gru_update(b, z, n, h)]


def _step_gated_mgu(b: _Builder, cell: RecurrentCell, state: list[str], xs: list[str]) -> list[str]:
    """``mgu`` (the gate sees the input), ``mgu1`` and ``mgu2`` (the state only)."""
    (h,) = state
    x_f, x_n = xs if len(xs) == 2 else (None, xs[0])
    m = cell.hidden_size
    f = b.op("Sigmoid", _gate_preactivation(b, cell, h, x_f))
    n = _candidate(b, x_n, b.op("Mul", f, h), numpy_of(cell.weight_hh[m:]))
    return [_mgu_update(b, f, n, h)]


def _constant_gates(cell: RecurrentCell, blocks: int) -> list[Array]:
    m = cell.hidden_size
    bias = numpy_of(cell.bias_ih)
    return [1.0 / (1.0 + np.exp(-bias[k * m : (k + 1) * m])) for k in range(blocks)]


def _step_constant_gate(
    b: _Builder, cell: RecurrentCell, state: list[str], xs: list[str]
) -> list[str]:
    """``gru3`` and ``mgu3``: gates are constants, so ``(g * h) @ U.T == h @ (diag(g) U.T)``."""
    (h,), (x_n,) = state, xs
    if cell.kind == "gru3":
        r, z = _constant_gates(cell, 2)
        n = _candidate(b, x_n, h, numpy_of(cell.weight_hh) * r[None, :])
        return [_gru_update(b, b.const("z", z), n, h)]
    (f,) = _constant_gates(cell, 1)
    n = _candidate(b, x_n, h, numpy_of(cell.weight_hh) * f[None, :])
    return [_mgu_update(b, b.const("f", f), n, h)]


#: LSTM gate blocks reordered from PyTorch's (i, f, g, o) to (i, f, o, g): sigmoids contiguous
_LSTM_SCAN_ORDER = (0, 1, 3, 2)


def _step_lstm(b: _Builder, cell: RecurrentCell, state: list[str], xs: list[str]) -> list[str]:
    (h, c), (xp,) = state, xs
    m = cell.hidden_size
    u = _transposed(b, "u", _reorder(numpy_of(cell.weight_hh), m, _LSTM_SCAN_ORDER))
    sig_in, tanh_in = b.split(b.op("Gemm", h, u, xp), [3 * m, m])  # (B, 3m), (B, m)
    i, f, o = b.split(b.op("Sigmoid", sig_in), [m, m, m])
    c_new = b.op("Add", b.op("Mul", f, c), b.op("Mul", i, b.op("Tanh", tanh_in)))
    return [b.op("Mul", o, b.op("Tanh", c_new)), c_new]


def _reorder(blocks: Array, m: int, order: Sequence[int]) -> Array:
    """Reorder the m-sized blocks along the first axis."""
    return np.concatenate([blocks[k * m : (k + 1) * m] for k in order])


def _scan_projection(cell: RecurrentCell) -> Projection:
    """What the loop body of each cell expects to be hoisted, and how it is split."""
    m, kind = cell.hidden_size, cell.kind
    weight, bias = numpy_of(cell.weight_ih), numpy_of(cell.input_bias())
    if kind == "gru":  # b_hr and b_hz add to the input side; b_hn stays in the body
        bias = bias + np.concatenate([_rows(cell.bias_hh, 0, 2 * m), np.zeros(m)])
        return Projection(weight, bias, [2 * m, m])
    if kind == "lstm":  # both biases add to the input side
        bias = bias + numpy_of(cell.bias_hh) if cell.bias_hh is not None else bias
        order = _LSTM_SCAN_ORDER
        return Projection(_reorder(weight, m, order), _reorder(bias, m, order), [4 * m])
    if kind == "gru-classic":
        return Projection(weight, bias, [2 * m, m])
    if kind == "mgu":
        return Projection(weight, bias, [m, m])
    return Projection(weight, bias, [m])  # gates see no input: the candidate's W_n x + b_n only


SCAN_STEPS: dict[str, StepBuilder] = {
    "gru": _step_gru,
    "gru-classic": _step_gated_gru,
    "gru1": _step_gated_gru,
    "gru2": _step_gated_gru,
    "gru3": _step_constant_gate,
    "mgu": _step_gated_mgu,
    "mgu1": _step_gated_mgu,
    "mgu2": _step_gated_mgu,
    "mgu3": _step_constant_gate,
    "lstm": _step_lstm,
}


# ---------------------------------------------------------------------------------------------
# Layers


def _float_info(name: str, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _hoist(g: _Builder, seq: str, projection: Projection, norm: InputNorm | None) -> list[str]:
    """``seq @ W.T + b`` for every step at once, split into the body's scan inputs."""
    weight, bias = projection.weight, projection.bias
    if norm is not None:
        weight, bias = norm.fold(weight, bias)
    xp = g.op("Add", g.op("MatMul", seq, _transposed(g, "w", weight)), g.const("b", bias))
    return g.split(xp, projection.blocks)  # each (T, B, block)


def _scan_body(cell: RecurrentCell, layer: int, blocks: list[int]) -> onnx.GraphProto:
    """One step: inputs (states..., hoisted blocks..., keep); outputs (states..., h_new)."""
    b = _Builder(prefix=f"l{layer}_")
    m = cell.hidden_size
    states = [f"l{layer}_state{k}_in" for k in range(cell.num_states)]
    xs = [f"l{layer}_x{k}_in" for k in range(len(blocks))]
    keep = f"l{layer}_keep_in"
    new = SCAN_STEPS[cell.kind](b, cell, states, xs)
    # Rows past their length keep their state; their h output is masked later, so it can be new[0].
    kept = [b.op("Where", keep, n, s) for n, s in zip(new, states, strict=True)]
    inputs = [_float_info(s, [None, m]) for s in states]
    inputs += [_float_info(x, [None, k]) for x, k in zip(xs, blocks, strict=True)]
    inputs.append(helper.make_tensor_value_info(keep, TensorProto.BOOL, [None, 1]))
    outputs = [_float_info(s, [None, m]) for s in [*kept, new[0]]]
    return helper.make_graph(b.nodes, f"l{layer}_step", inputs, outputs, b.initializers)


def _scan_layer(
    g: _Builder, cell: RecurrentCell, layer: int, seq: str, mask: str, init: list[str],
    norm: InputNorm | None,
) -> tuple[str, list[str]]:  # fmt: skip
    """Return the layer's output sequence ``(T, B, m)`` and its final states ``(B, m)`` each."""
    projection = _scan_projection(cell)
    xs = _hoist(g, seq, projection, norm)
    body = _scan_body(cell, layer, projection.blocks)
    outs = [g.fresh(f"l{layer}_final") for _ in init] + [g.fresh(f"l{layer}_seq")]
    g.ops("Scan", *init, *xs, mask, outs=outs, body=body, num_scan_inputs=len(xs) + 1)
    return outs[-1], outs[:-1]


#: PyTorch block order -> ONNX order: GRU (r, z, n) -> (z, r, h); LSTM (i, f, g, o) -> (i, o, f, c)
_NATIVE_ORDER = {"gru": (1, 0, 2), "lstm": (0, 3, 1, 2)}


def _native_layer(
    g: _Builder, cell: RecurrentCell, layer: int, seq: str, lengths32: str, init: list[str],
    norm: InputNorm | None,
) -> tuple[str, list[str]]:  # fmt: skip
    """ONNX GRU/LSTM op; ``init`` and the returned states are ``(1, B, m)``."""
    m, order = cell.hidden_size, _NATIVE_ORDER[cell.kind]
    weight, bias_ih = numpy_of(cell.weight_ih), numpy_of(cell.bias_ih)
    if norm is not None:
        weight, bias_ih = norm.fold(weight, bias_ih)
    assert cell.bias_hh is not None
    bias_hh = numpy_of(cell.bias_hh)
    bias = np.concatenate([_reorder(bias_ih, m, order), _reorder(bias_hh, m, order)])  # (2 k m,)
    w = g.const("W", _reorder(weight, m, order)[None])  # (1, k m, n)
    r = g.const("R", _reorder(numpy_of(cell.weight_hh), m, order)[None])  # (1, k m, m)
    inputs = [seq, w, r, g.const("B", bias[None]), lengths32, *init]
    outs = [g.fresh(f"l{layer}_y")] + [g.fresh(f"l{layer}_final") for _ in init]
    attrs: dict[str, object] = {"hidden_size": m}
    if cell.kind == "gru":
        attrs["linear_before_reset"] = 1  # PyTorch's reset-after form; ONNX defaults to 0
    g.ops(cell.kind.upper(), *inputs, outs=outs, **attrs)
    return g.op("Squeeze", outs[0], g.const("axis1", [1], np.int64)), outs[1:]  # (T, B, m)


# ---------------------------------------------------------------------------------------------
# The whole model


def _step_mask(g: _Builder, x: str, lengths: str) -> str:
    """``mask[t, b, 0] = t < lengths[b]``, shape ``(T, B, 1)``, bool."""
    steps_count = g.op("Squeeze", g.op("Shape", x, start=1, end=2))  # scalar T
    steps = g.op("Range", g.const("zero", 0, np.int64), steps_count, g.const("one", 1, np.int64))
    steps = g.op("Unsqueeze", steps, g.const("axes12", [1, 2], np.int64))  # (T, 1, 1)
    return g.op("Less", steps, g.op("Unsqueeze", lengths, g.const("axis1", [1], np.int64)))


def _head(g: _Builder, model: RecurrentModel, seq: str, mask: str) -> str:
    """Linear head with the output de-normalisation folded in; zero at padding; ``(B, T, o)``."""
    weight, bias = numpy_of(model.head.weight), numpy_of(model.head.bias)  # (o, m), (o,)
    if model.config.head == "regression":
        std, mean = buffer_of(model, "output_std"), buffer_of(model, "output_mean")
        weight, bias = weight * std[:, None], bias * std + mean
    y = g.op("Add", g.op("MatMul", seq, _transposed(g, "head_w", weight)), g.const("head_b", bias))
    y = g.op("Where", mask, y, g.const("zero_f", 0.0))  # (T, B, o)
    return g.op("Transpose", y, out="y", perm=[1, 0, 2])


def _initial_states(g: _Builder, name: str, layer: int, native: bool) -> str:
    """Layer ``layer`` of an ``(L, B, m)`` state input: ``(1, B, m)`` native, ``(B, m)`` scan."""
    index = g.const("layer", [layer] if native else layer, np.int64)
    return g.op("Gather", name, index, axis=0)


def _stack_layers(g: _Builder, finals: list[str], out: str, native: bool) -> None:
    layers = (
        finals
        if native
        else [g.op("Unsqueeze", f, g.const("axis0", [0], np.int64)) for f in finals]
    )
    if len(layers) == 1:
        g.op("Identity", layers[0], out=out)
    else:
        g.op("Concat", *layers, out=out, axis=0)


def check_form(cell: str, form: str) -> None:
    if form not in GRAPH_FORMS:
        raise ValueError(f"unknown graph form {form!r}; choose one of {', '.join(GRAPH_FORMS)}")
    if form == "native" and cell not in NATIVE_CELLS:
        raise ValueError(
            f"graph form 'native' exists only for {' and '.join(NATIVE_CELLS)}, not {cell!r}"
        )


def state_names(num_states: int) -> tuple[list[str], list[str]]:
    """Graph names of the state inputs and outputs, paired by position."""
    return ["h0", "c0"][:num_states], ["hn", "cn"][:num_states]


def build_model_proto(model: RecurrentModel, form: str = "scan") -> onnx.ModelProto:
    """Build the graph of ``model`` (its weights as they are now) as ``scan`` or ``native``."""
    c = model.config
    check_form(c.cell, form)
    native = form == "native"
    g = _Builder()
    state_in, state_out = state_names(c.num_states)
    x_tm = g.op("Transpose", "x", perm=[1, 0, 2])  # (T, B, n)
    mask = _step_mask(g, "x", "lengths")  # (T, B, 1)
    lengths32 = g.op("Cast", "lengths", to=TensorProto.INT32) if native else ""
    norm = InputNorm(buffer_of(model, "input_mean"), buffer_of(model, "input_std"))
    seq = x_tm
    finals: list[list[str]] = [[] for _ in state_in]  # per state: each layer's final state
    for layer, cell in enumerate(cells_of(model)):
        init = [_initial_states(g, name, layer, native) for name in state_in]
        layer_norm = norm if layer == 0 else None
        if native:
            seq, states = _native_layer(g, cell, layer, seq, lengths32, init, layer_norm)
        else:
            seq, states = _scan_layer(g, cell, layer, seq, mask, init, layer_norm)
        for k, s in enumerate(states):
            finals[k].append(s)
    _head(g, model, seq, mask)
    for name, layers in zip(state_out, finals, strict=True):
        _stack_layers(g, layers, name, native)
    return _finish(g, c, state_in, state_out)


def _finish(
    g: _Builder, c: ModelConfig, state_in: list[str], state_out: list[str]
) -> onnx.ModelProto:
    state_shape: list[int | str] = [c.num_layers, "batch", c.hidden_size]
    inputs = [_float_info("x", ["batch", "time", c.input_size])]
    inputs += [_float_info(name, state_shape) for name in state_in]
    inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]))
    outputs = [_float_info("y", ["batch", "time", c.output_size])]
    outputs += [_float_info(name, state_shape) for name in state_out]
    graph = helper.make_graph(g.nodes, f"rnnserve_{c.cell}", inputs, outputs, g.initializers)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="rnnserve",
        ir_version=IR_VERSION,
    )
    return proto
