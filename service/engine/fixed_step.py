"""Fixed-shape calls, the form a CUDA graph needs: static shapes, no loops, buffers bound once.

ONNX Runtime captures a CUDA graph (provider option ``enable_cuda_graph``) only when every node
runs on the GPU and nothing in the call depends on the host: no control flow (Scan, Loop, If) and
no shape arithmetic left on the CPU. ``static_model`` turns a graph with dynamic batch and time
into one for a fixed batch and a single time step: it fixes the dims of the inputs and outputs
(so ONNX Runtime folds every Shape node into a constant) and inlines each Scan, which with one
time step runs its body exactly once. ``FixedCall`` runs such a model on OrtValues allocated and
bound once; each call copies the new inputs into them in place (the addresses a captured graph
was recorded with stay valid) and copies the outputs asked for back to the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import helper

CONTROL_FLOW = ("Scan", "Loop", "If")


class FixedStepError(Exception):
    """The model has no fixed-shape single-step form; the message says why."""


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _has_subgraph(graph: onnx.GraphProto) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute)


def _axes(name: str, values: Sequence[int]) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], list(values))
    return helper.make_node("Constant", [], [name], value=tensor)


def inline_scan(
    node: onnx.NodeProto, prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes (and initializers) that compute one iteration of Scan ``node``.

    Valid only when every scan input has length 1 along its scan axis: the scan inputs are
    squeezed on that axis, the body runs once on the initial states, and each scan output is the
    body's output unsqueezed on its output axis. Body names get ``prefix``; names the body reads
    from the enclosing graph keep theirs.
    """
    attrs = _attributes(node)
    body = attrs["body"]
    assert isinstance(body, onnx.GraphProto)
    if _has_subgraph(body):
        raise FixedStepError(f"Scan {node.name!r} nests a subgraph")
    scans = int(attrs["num_scan_inputs"])  # type: ignore[call-overload]
    states = len(node.input) - scans
    in_axes = list(attrs.get("scan_input_axes", [0] * scans))  # type: ignore[call-overload]
    out_axes = list(attrs.get("scan_output_axes", [0] * (len(body.output) - states)))  # type: ignore[call-overload]
    local = {v.name for v in body.input} | {i.name for i in body.initializer}
    local |= {out for n in body.node for out in n.output}

    def rename(name: str) -> str:
        return prefix + name if name in local else name

    nodes = []
    for k, (outer, inner) in enumerate(zip(node.input, body.input, strict=True)):
        if k < states:
            nodes.append(helper.make_node("Identity", [outer], [rename(inner.name)]))
        else:
            axes = f"{prefix}in_axes{k}"
            nodes.append(_axes(axes, [in_axes[k - states]]))
            nodes.append(helper.make_node("Squeeze", [outer, axes], [rename(inner.name)]))
    for inner_node in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner_node)
        copy.name = prefix + inner_node.name if inner_node.name else ""
        copy.input[:] = [rename(i) if i else "" for i in inner_node.input]
        copy.output[:] = [rename(o) if o else "" for o in inner_node.output]
        nodes.append(copy)
    for k, (outer, inner) in enumerate(zip(node.output, body.output, strict=True)):
        if not outer:
            continue
        if k < states:
            nodes.append(helper.make_node("Identity", [rename(inner.name)], [outer]))
        else:
            axes = f"{prefix}out_axes{k}"
            nodes.append(_axes(axes, [out_axes[k - states]]))
            nodes.append(helper.make_node("Unsqueeze", [rename(inner.name), axes], [outer]))
    initializers = []
    for init in body.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = rename(init.name)
        initializers.append(copy)
    return nodes, initializers


def _fix_dims(value: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    shape = value.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise FixedStepError(f"{value.name} has rank {len(shape.dim)}, not {len(dims)}")
    for dim, size in zip(shape.dim, dims, strict=True):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise FixedStepError(f"{value.name} has a fixed dim {dim.dim_value}, not {size}")
        dim.Clear()
        dim.dim_value = size


def static_model(
    model: onnx.ModelProto, dims: Mapping[str, Sequence[int]], prefix: str
) -> onnx.ModelProto:
    """A copy of ``model`` for one time step with every input and output fixed to ``dims``.

    Scan nodes are inlined (names prefixed with ``prefix``); other control flow is refused. The
    result is checked with ONNX's strict shape inference, which fails where a scan axis is not 1.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
            inlined, initializers = inline_scan(node, f"{prefix}scan{index}.")
            nodes += inlined
            graph.initializer.extend(initializers)
        elif node.op_type in CONTROL_FLOW:
            raise FixedStepError(f"the graph has a {node.op_type} node ({node.name!r})")
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")  # symbolic dims that no longer hold
    values = {v.name: v for v in (*graph.input, *graph.output)}
    missing = sorted(set(values) - set(dims))
    if missing:
        raise FixedStepError(f"no fixed dims given for {missing}")
    for name, value in values.items():
        _fix_dims(value, dims[name])
    try:
        onnx.checker.check_model(fixed)
        onnx.shape_inference.infer_shapes(fixed, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise FixedStepError(f"the single-step graph does not check: {exc}") from None
    return fixed


def _numpy_type(value: onnx.ValueInfoProto) -> np.dtype[np.generic]:
    return np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


class FixedCall:
    """One session of a static model whose inputs and outputs are OrtValues bound once.

    ``shared`` OrtValues (e.g. a state pool bound both as an input and as an output) are bound
    under their names; every other input and output gets a buffer of its own on ``device``.
    Not thread-safe: the caller serialises calls.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        model: onnx.ModelProto,
        device: str,
        device_id: int,
        shared: Mapping[str, ort.OrtValue],
    ) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.values: dict[str, ort.OrtValue] = {}
        for value in model.graph.input:
            self.binding.bind_ortvalue_input(
                value.name, self._value(value, device, device_id, shared)
            )
        for value in model.graph.output:
            self.binding.bind_ortvalue_output(
                value.name, self._value(value, device, device_id, shared)
            )

    def _value(
        self,
        value: onnx.ValueInfoProto,
        device: str,
        device_id: int,
        shared: Mapping[str, ort.OrtValue],
    ) -> ort.OrtValue:
        if value.name in shared:
            return shared[value.name]
        buffer = ort.OrtValue.ortvalue_from_shape_and_type(
            _shape(value), _numpy_type(value), device, device_id
        )
        self.values[value.name] = buffer
        return buffer

    def __call__(
        self, feeds: Mapping[str, npt.NDArray[np.generic]], fetch: Sequence[str]
    ) -> list[npt.NDArray[np.generic]]:
        """Copy ``feeds`` into the bound inputs, run, and return host copies of ``fetch``."""
        for name, array in feeds.items():
            self.values[name].update_inplace(array)
        self.session.run_with_iobinding(self.binding)
        return [np.array(self.values[name].numpy(), copy=True) for name in fetch]
