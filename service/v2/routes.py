"""The Open Inference Protocol (KServe V2) with Triton's sequence and binary-tensor extensions.

A thin layer: it decodes V2 requests into data-plane calls and encodes the results back. Statuses
follow Triton's mapping: every invalid argument is 400 (where the native API says 413 or 422),
unknown models 404, unavailable 503.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api.responses import OrjsonResponse
from service.api.rest import Caller, Plane, get_caller
from service.engine.dataplane import DataPlane
from service.engine.errors import BadRequest, InvalidInput, NotReady, PayloadTooLarge
from service.engine.models import ServedModel
from service.v2 import schemas
from service.v2.codec import (
    HEADER_LENGTH,
    InferRequest,
    InputTensor,
    decode_request,
    encode_response,
)
from service.v2.sequences import SequenceFlags, SequenceTable

SERVER_NAME = "rnnserve"
EXTENSIONS = ["binary_tensor_data", "sequence", "model_configuration"]

health = APIRouter(prefix="/v2/health", tags=["v2"])
v2 = APIRouter(prefix="/v2", tags=["v2"], dependencies=[Depends(get_caller)])


def get_sequences(request: Request) -> SequenceTable:
    """The app's table of open V2 sequences (created with the app)."""
    table: SequenceTable = request.app.state.v2_sequences
    return table


Sequences = Annotated[SequenceTable, Depends(get_sequences)]


@asynccontextmanager
async def triton_statuses() -> AsyncIterator[None]:
    """Report the native API's 413 and 422 as Triton's 400 (invalid argument)."""
    try:
        yield
    except (InvalidInput, PayloadTooLarge) as exc:
        raise BadRequest(exc.message) from None


@health.get("/live", response_model=schemas.Live)
async def live() -> Response:
    """The process is up (Triton: ``is_server_live``)."""
    return OrjsonResponse({"live": True})


@health.get("/ready", response_model=schemas.Ready)
async def ready(dataplane: Plane) -> Response:
    """Ready once the models are loaded (Triton: ``is_server_ready``)."""
    if not dataplane.ready:
        raise NotReady()
    return OrjsonResponse({"ready": True})


@v2.get("", response_model=schemas.ServerMetadata)
async def server_metadata(request: Request) -> Response:
    """Server name, version and the protocol extensions served."""
    return OrjsonResponse(
        {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}
    )


def _tensor(name: str, dims: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": dims}


def _signature(model: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    meta = model.metadata
    state = [meta.num_layers, -1, meta.hidden_size]
    inputs = [_tensor("x", [-1, -1, meta.input_size])]
    inputs += [_tensor(name, state) for name in meta.state_inputs]
    inputs.append(_tensor("lengths", [-1], "INT64"))
    outputs = [_tensor("y", [-1, -1, meta.output_size])]
    outputs += [_tensor(name, state) for name in meta.state_outputs]
    return inputs, outputs


@v2.get("/models/{name}", response_model=schemas.ModelMetadata)
@v2.get("/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
async def model_metadata(name: str, dataplane: Plane, version: int | None = None) -> Response:
    """Inputs, outputs and versions of a model (the highest version unless one is named)."""
    model = dataplane.model(name, version)
    versions = [m.version for m in dataplane.repository.versions(name)]
    inputs, outputs = _signature(model)
    return OrjsonResponse(
        {
            "name": name,
            "versions": [str(v) for v in (versions if version is None else [version])],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
        }
    )


@v2.get("/models/{name}/ready", response_model=schemas.ModelReady)
@v2.get("/models/{name}/versions/{version}/ready", response_model=schemas.ModelReady)
async def model_ready(name: str, dataplane: Plane, version: int | None = None) -> Response:
    """200 when the model version is loaded and serving; 404 for an unknown one."""
    dataplane.model(name, version)
    return OrjsonResponse({"name": name, "ready": True})


@v2.get("/models/{name}/config", response_model=schemas.ModelConfig)
@v2.get("/models/{name}/versions/{version}/config", response_model=schemas.ModelConfig)
async def model_config(
    name: str, request: Request, dataplane: Plane, version: int | None = None
) -> Response:
    """The model's configuration in the shape of Triton's model config (JSON)."""
    model = dataplane.model(name, version)
    meta = model.metadata
    inputs, outputs = _signature(model)

    def dims(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"]}
            for t in tensors
        ]

    settings = request.app.state.settings
    return OrjsonResponse(
        {
            "name": name,
            "version": str(model.version),
            "platform": "onnxruntime_onnx",
            "max_batch_size": 0,
            "input": dims(inputs),
            "output": dims(outputs),
            "sequence_batching": {
                "max_sequence_idle_microseconds": int(settings.idle_ttl_s * 1_000_000),
                "max_queue_delay_microseconds": int(settings.max_batch_delay_ms * 1000),
                "preferred_batch_size": [settings.max_batch_size],
            },
            "parameters": {
                "cell": {"string_value": meta.cell},
                "num_layers": {"string_value": str(meta.num_layers)},
                "hidden_size": {"string_value": str(meta.hidden_size)},
                "provider": {"string_value": model.provider},
            },
        }
    )


INFER: dict[str, Any] = {
    "response_model": schemas.InferResponse,
    "openapi_extra": schemas.INFER_REQUEST_EXAMPLE,
}


@v2.post("/models/{name}/infer", **INFER)
@v2.post("/models/{name}/versions/{version}/infer", **INFER)
async def infer(
    name: str,
    request: Request,
    dataplane: Plane,
    sequences: Sequences,
    caller: Caller,
    version: int | None = None,
) -> Response:
    """Run ``x`` (FP32 [batch, time, input_size]); with ``sequence_id`` the state carries over."""
    body = _decompress(await request.body(), request)
    decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
    model = dataplane.model(name, version)
    flags = SequenceFlags.from_parameters(decoded.parameters)
    async with triton_statuses():
        tensors = _inputs(decoded, model, sequence=flags.id is not None)
        wanted = _wanted_outputs(decoded, model)
        if flags.id is None:
            parameters, outputs = await _stateless(dataplane, model, tensors)
        else:
            parameters, outputs = await _sequence(
                dataplane, sequences, model, tensors, flags, caller, version
            )
    header: dict[str, Any] = {"model_name": name, "model_version": str(model.version)}
    if decoded.id is not None:
        header["id"] = decoded.id
    header["parameters"] = parameters
    selected = [(n, outputs[n]) for n in wanted]
    content, headers = encode_response(header, selected, decoded)
    return Response(content=content, headers=headers)


def _decompress(body: bytes, request: Request) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate, bounded by the request size limit."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    limit: int = request.app.state.settings.max_request_bytes
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"decompressed request body is larger than {limit} bytes")
    return data


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
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    session_id, result = await table.step(
        dataplane, flags, caller, model.name, version, tensors["x"].data[0]
    )
    y = result.outputs[None]  # (1, T, o)
    states = result.state[:, :, None]  # (S, L, 1, m)
    parameters = {
        "sequence_id": flags.id,
        "sequence_start": flags.start,
        "sequence_end": flags.end,
        "session_id": session_id,
        "step_count": result.step_count,
    }
    return parameters, {"y": y, **dict(zip(model.metadata.state_outputs, states, strict=True))}
