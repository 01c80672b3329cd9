"""Translating KServe V2 gRPC messages to and from the protocol-agnostic V2 core.

A ``ModelInferRequest`` becomes the same ``service.v2.codec.InferRequest`` the HTTP route builds
(tensor values from ``raw_input_contents``, one entry per input in order, or from each input's
typed ``contents``); an ``InferResult`` becomes a ``ModelInferResponse`` whose tensors travel in
``raw_output_contents`` (little-endian, row-major), as Triton answers over gRPC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format

from service.engine.errors import BadRequest
from service.grpc.proto import grpc_service_pb2 as pb
from service.grpc.proto import model_config_pb2 as mc
from service.v2.codec import DATATYPES, InferRequest, InputTensor, RequestedOutput, check_shape
from service.v2.infer import InferResult

INT64_MAX = (1 << 63) - 1

#: the ``InferTensorContents`` field that carries each datatype (FP16 travels raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def model_version(text: str) -> int | None:
    """A request's ``model_version``: empty means the highest version."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"model version must be an integer, got {text!r}") from None


def parameters(raw: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """Request parameters as plain values (``sequence_id`` may be int64, uint64 or a string)."""
    values = {}
    for key, parameter in raw.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def set_parameter(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if value > INT64_MAX:
            target.uint64_param = value
        else:
            target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def decode_request(request: pb.ModelInferRequest) -> InferRequest:
    """The V2 core's view of a ``ModelInferRequest``; raises ``BadRequest`` naming the problem."""
    if not request.inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of 'inputs'"
        )
    inputs = [
        _decode_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)
    ]
    outputs = [RequestedOutput(output.name, binary=True) for output in request.outputs]
    return InferRequest(
        id=request.id or None,
        parameters=parameters(request.parameters),
        inputs=inputs,
        outputs=outputs or None,
        binary_default=True,
    )


def _decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    name, datatype = tensor.name, tensor.datatype
    if not name:
        raise BadRequest("every input needs a non-empty 'name'")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"input {name!r}: unsupported datatype {datatype!r}")
    shape = check_shape(list(tensor.shape), name)
    count = math.prod(shape)
    if raw is None:
        array = _typed_contents(tensor, count)
    else:
        if tensor.HasField("contents"):
            raise BadRequest(
                f"input {name!r}: give its values in raw_input_contents or in contents, not both"
            )
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise BadRequest(
                f"input {name!r}: raw_input_contents holds {len(raw)} bytes, but shape "
                f"{list(shape)} of {datatype} needs {expected}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    return InputTensor(name, datatype, shape, array.reshape(shape))


def _typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, count: int
) -> np.ndarray[Any, Any]:
    name, datatype = tensor.name, tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} values travel in raw_input_contents only")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise BadRequest(
            f"input {name!r}: 'contents' has {len(values)} values, but its shape needs {count}"
        )
    try:
        return np.array(values, dtype=DATATYPES[datatype])
    except OverflowError:
        raise BadRequest(f"input {name!r}: a value does not fit {datatype}") from None


def fill_response(
    target: pb.ModelInferResponse, request: pb.ModelInferRequest, result: InferResult
) -> None:
    """Write ``result`` into ``target`` (a fresh response, or a stream response's field)."""
    target.model_name = request.model_name
    target.model_version = str(result.model.version)
    target.id = request.id
    for key, value in result.parameters.items():
        if value is not None:  # a parameter without a value is left out, not sent as "None"
            set_parameter(target.parameters[key], value)
    for name, array in result.outputs:
        data = np.ascontiguousarray(array, dtype="<f4")
        target.outputs.add(name=name, datatype="FP32", shape=data.shape)
        target.raw_output_contents.append(data.tobytes())


def model_metadata(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    """``service.v2.describe.model_metadata`` as its gRPC message."""
    message = pb.ModelMetadataResponse()
    json_format.ParseDict(metadata, message, ignore_unknown_fields=True)
    return message


def model_config(config: dict[str, Any]) -> mc.ModelConfig:
    """``service.v2.describe.model_config`` as Triton's ``ModelConfig`` message.

    Fields Triton's config has no place for (``version``) are left out. The batching figures
    the JSON config lists directly under ``sequence_batching`` live in its ``oldest`` strategy in
    Triton's message, so they move there.
    """
    config = dict(config)
    batching = dict(config.get("sequence_batching") or {})
    oldest = {
        key: batching.pop(key)
        for key in ("max_queue_delay_microseconds", "preferred_batch_size")
        if key in batching
    }
    if oldest:
        batching["oldest"] = oldest
    config["sequence_batching"] = batching
    message = mc.ModelConfig()
    json_format.ParseDict(config, message, ignore_unknown_fields=True)
    return message
