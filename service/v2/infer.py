"""The protocol-agnostic core of V2 inference, shared by the HTTP and gRPC front ends.

A front end decodes its wire format into an ``InferRequest`` (``service.v2.codec``), calls
``run_infer`` and encodes the ``InferResult`` back. Statuses follow Triton's mapping: every invalid
argument is a ``BadRequest`` (where the native API says 413 or 422), unknown models 404,
unavailable 503.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.engine.dataplane import DataPlane
from service.engine.errors import BadRequest, InvalidInput, PayloadTooLarge
from service.engine.models import ServedModel
from service.v2.codec import InferRequest, InputTensor
from service.v2.sequences import SequenceFlags, SequenceTable


@dataclass(frozen=True)
class InferResult:
    """The model version that ran, the response parameters and the requested outputs in order."""

    model: ServedModel
    parameters: dict[str, Any]
    outputs: list[tuple[str, np.ndarray[Any, Any]]]


async def run_infer(
    dataplane: DataPlane,
    sequences: SequenceTable,
    name: str,
    version: int | None,
    request: InferRequest,
    caller: str | None,
) -> InferResult:
    """Run one decoded V2 request: stateless, or one step of a sequence when it has an id."""
    model = dataplane.model(name, version)
    flags = SequenceFlags.from_parameters(request.parameters)
    try:
        tensors = _inputs(request, model, sequence=flags.id is not None)
        wanted = _wanted_outputs(request, model)
        if flags.id is None:
            parameters, outputs = await _stateless(dataplane, model, tensors)
        else:
            parameters, outputs = await _sequence(
                dataplane, sequences, model, tensors, flags, caller, version, wanted
            )
    except (InvalidInput, PayloadTooLarge) as exc:  # Triton says "invalid argument": 400
        raise BadRequest(exc.message, **exc.details) from None
    return InferResult(model, parameters, [(n, outputs[n]) for n in wanted])


def _inputs(request: InferRequest, model: ServedModel, sequence: bool) -> dict[str, InputTensor]:
    """Check the inputs' names, datatypes and shapes against the model."""
    meta = model.metadata
    allowed = {"x"} if sequence else {"x", "lengths", *meta.state_inputs}
    tensors: dict[str, InputTensor] = {}
    for tensor in request.inputs:
        if tensor.name not in allowed:
            raise BadRequest(
                f"unexpected input {tensor.name!r} for model '{meta.name}'; "
                f"{'a sequence request takes' if sequence else 'expected'} "
                f"{', '.join(sorted(allowed))}"
            )
        if tensor.name in tensors:
            raise BadRequest(f"input {tensor.name!r} is given twice")
        tensors[tensor.name] = tensor
    if "x" not in tensors:
        raise BadRequest(f"input 'x' (FP32 [batch, time, {meta.input_size}]) is missing")
    x = tensors["x"]
    if x.datatype != "FP32":
        raise BadRequest(f"input 'x' must be FP32, got {x.datatype}")
    if len(x.shape) != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != meta.input_size:
        raise BadRequest(
            f"input 'x' must have shape [batch, time, {meta.input_size}] with batch and time "
            f">= 1, got {list(x.shape)}"
        )
    if sequence and x.shape[0] != 1:
        raise BadRequest(
            f"a sequence request carries one sequence: 'x' must have batch 1, got {x.shape[0]}"
        )
    return tensors


def _wanted_outputs(request: InferRequest, model: ServedModel) -> list[str]:
    available = ["y", *model.metadata.state_outputs]
    if request.outputs is None:
        return available
    for output in request.outputs:
        if output.name not in available:
            raise BadRequest(
                f"unknown output {output.name!r}; model '{model.name}' has outputs "
                f"{', '.join(available)}"
            )
    return [output.name for output in request.outputs]


def _lengths(tensors: dict[str, InputTensor], batch: int, steps: int) -> list[int]:
    if "lengths" not in tensors:
        return [steps] * batch
    lengths = tensors["lengths"]
    if lengths.datatype not in ("INT32", "INT64") or lengths.shape != (batch,):
        raise BadRequest(f"input 'lengths' must be INT64 or INT32 of shape [{batch}]")
    values = [int(v) for v in lengths.data]
    bad = [v for v in values if not 1 <= v <= steps]
    if bad:
        raise BadRequest(f"input 'lengths' has {bad[0]}; every length must be in 1..{steps}")
    return values


def _initial_states(
    tensors: dict[str, InputTensor], model: ServedModel, batch: int
) -> list[np.ndarray[Any, Any]] | None:
    meta = model.metadata
    given = [name for name in meta.state_inputs if name in tensors]
    if not given:
        return None
    if len(given) != len(meta.state_inputs):
        raise BadRequest(f"give all of {', '.join(meta.state_inputs)} or none")
    shape = (meta.num_layers, batch, meta.hidden_size)
    states = []
    for name in meta.state_inputs:
        tensor = tensors[name]
        if tensor.datatype != "FP32" or tensor.shape != shape:
            raise BadRequest(f"input {name!r} must be FP32 of shape {list(shape)}")
        if not np.isfinite(tensor.data).all():
            raise BadRequest(f"input {name!r} holds NaN or infinity")
        states.append(tensor.data)
    stacked = np.stack(states)  # (S, L, B, m)
    return [np.ascontiguousarray(stacked[:, :, b]) for b in range(batch)]


async def _stateless(
    dataplane: DataPlane, model: ServedModel, tensors: dict[str, InputTensor]
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    x = tensors["x"].data
    batch, steps, _ = x.shape
    lengths = _lengths(tensors, batch, steps)
    sequences = [x[b, : lengths[b]] for b in range(batch)]
    states = _initial_states(tensors, model, batch)
    _, results = await dataplane.predict(
        model.name, sequences, version=model.version, initial_states=states
    )
    y = np.zeros((batch, steps, model.metadata.output_size), dtype=np.float32)
    for b, result in enumerate(results):
        y[b, : lengths[b]] = result.outputs
    finals = np.stack([r.state for r in results], axis=2)  # (S, L, B, m)
    return {}, {"y": y, **dict(zip(model.metadata.state_outputs, finals, strict=True))}


async def _sequence(
    dataplane: DataPlane,
    table: SequenceTable,
    model: ServedModel,
    tensors: dict[str, InputTensor],
    flags: SequenceFlags,
    caller: str | None,
    version: int | None,
    wanted: list[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    session_id, result = await table.step(
        dataplane, flags, caller, model.name, version, tensors["x"].data[0]
    )
    outputs: dict[str, np.ndarray[Any, Any]] = {"y": result.outputs[None]}  # (1, T, o)
    if len(wanted) > 1 or wanted[0] != "y":  # the state is copied out of the batch only if asked
        states = result.state[:, :, None]  # (S, L, 1, m)
        outputs.update(zip(model.metadata.state_outputs, states, strict=True))
    parameters = {
        "sequence_id": flags.id,
        "sequence_start": flags.start,
        "sequence_end": flags.end,
        "session_id": session_id,
        "step_count": result.step_count,
    }
    return parameters, outputs
