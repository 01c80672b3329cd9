"""Reading and writing Open Inference Protocol (KServe V2) tensors, with Triton's binary extension.

A request body is a JSON header, optionally followed by raw tensor bytes. When binary data follows,
the ``Inference-Header-Content-Length`` header gives the JSON header's size, and each binary input
declares ``"parameters": {"binary_data_size": N}``; the bytes follow in input order, little-endian,
row-major. A response is built the same way: outputs asked for in binary carry ``binary_data_size``
and their bytes follow the JSON header, whose size goes into the same header of the response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.engine.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8  # no input of a recurrent model has more dimensions; numpy stops at 64

#: V2 datatypes this service can decode, and their numpy types (little-endian).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


@dataclass
class InputTensor:
    """One decoded input tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@dataclass
class RequestedOutput:
    """One entry of the request's ``outputs``: which output, and whether to send it as bytes."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded ``/infer`` request."""

    id: str | None
    parameters: dict[str, Any]
    inputs: list[InputTensor]
    #: None when the request names no outputs: then every output is returned
    outputs: list[RequestedOutput] | None
    #: the request-level ``binary_data_output`` parameter: the default for unnamed outputs
    binary_default: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, name: str) -> bool:
        for output in self.outputs or []:
            if output.name == name:
                return output.binary
        return self.binary_default


def _header_length(value: str | None, body_size: int) -> int:
    if value is None:
        return body_size
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < length <= body_size:
        raise BadRequest(f"{HEADER_LENGTH} is {length}, but the request body has {body_size} bytes")
    return length


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def check_shape(raw: Any, name: str) -> tuple[int, ...]:
    """An input's shape as a tuple, or BadRequest (both V2 front ends, HTTP and gRPC)."""
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_RANK:
        raise BadRequest(f"input {name!r}: 'shape' has {len(raw)} dimensions; at most {MAX_RANK}")
    return tuple(raw)


def _flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested JSON lists (the protocol allows flat or nested data)."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_tensor(name: str, datatype: str, count: int, data: Any) -> np.ndarray[Any, Any]:
    values = _flatten(data)
    if len(values) != count:
        raise BadRequest(
            f"input {name!r}: 'data' has {len(values)} values, but its shape needs {count}"
        )
    for index, value in enumerate(values):
        if (isinstance(value, bool) and datatype != "BOOL") or not isinstance(value, int | float):
            raise BadRequest(f"input {name!r}: value {index} is {value!r}, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"input {name!r}: value {index} is not finite")
    try:
        return np.asarray(values, dtype=DATATYPES[datatype])
    except OverflowError:
        raise BadRequest(f"input {name!r}: a value does not fit {datatype}") from None


def _decode_input(raw: Any, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    tensor = _object(raw, "each entry of 'inputs'")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("every input needs a non-empty string 'name'")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: unsupported datatype {datatype!r}")
    shape = check_shape(tensor.get("shape"), name)
    count = math.prod(shape)
    params = _object(tensor.get("parameters") or {}, f"input {name!r} 'parameters'")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise BadRequest(f"input {name!r} has neither 'data' nor 'binary_data_size'")
        array = _json_tensor(name, datatype, count, tensor["data"])
    else:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise BadRequest(
                f"input {name!r}: binary_data_size {size!r} does not fit the "
                f"{len(binary) - offset} bytes left after the JSON header"
            )
        expected = count * DATATYPES[datatype].itemsize
        if size != expected:
            raise BadRequest(
                f"input {name!r}: binary_data_size is {size} bytes, but shape {list(shape)} "
                f"of {datatype} needs {expected}"
            )
        array = np.frombuffer(binary[offset : offset + size], dtype=DATATYPES[datatype])
        offset += size
    return InputTensor(name, datatype, shape, array.reshape(shape)), offset


def _decode_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    outputs = []
    for entry in raw:
        output = _object(entry, "each entry of 'outputs'")
        name = output.get("name")
        if not isinstance(name, str):
            raise BadRequest("every requested output needs a string 'name'")
        params = _object(output.get("parameters") or {}, f"output {name!r} 'parameters'")
        outputs.append(RequestedOutput(name, bool(params.get("binary_data", False))))
    return outputs


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode an ``/infer`` body; ``header_length`` is the Inference-Header-Content-Length value."""
    length = _header_length(header_length, len(body))
    try:
        header = orjson.loads(body[:length])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    header = _object(header, "the request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    binary, offset, inputs = memoryview(body)[length:], 0, []
    for raw in raw_inputs:
        tensor, offset = _decode_input(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes follow the JSON header that no input's "
            "binary_data_size accounts for"
        )
    parameters = _object(header.get("parameters") or {}, "'parameters'")
    request_id = header.get("id")
    return InferRequest(
        id=None if request_id is None else str(request_id),
        parameters=parameters,
        inputs=inputs,
        outputs=_decode_outputs(header.get("outputs")),
        binary_default=bool(parameters.get("binary_data_output", False)),
    )


def encode_response(
    header: dict[str, Any], outputs: list[tuple[str, np.ndarray[Any, Any]]], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """Build the response body and its extra headers; ``header`` holds model_name, id, ..."""
    entries, chunks = [], []
    for name, array in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        data = np.ascontiguousarray(array, dtype="<f4")
        if request.wants_binary(name):
            raw = data.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data.ravel().tolist()
        entries.append(entry)
    json_part = orjson.dumps({**header, "outputs": entries})
    if not chunks:
        return json_part, {"Content-Type": "application/json"}
    body = b"".join([json_part, *chunks])
    return body, {
        HEADER_LENGTH: str(len(json_part)),
        "Content-Type": "application/octet-stream",
    }
