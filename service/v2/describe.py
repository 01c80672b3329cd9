"""What the V2 metadata and repository endpoints say, as plain dicts, shared by the HTTP and gRPC
front ends.

The state inputs (``h0``, ``c0``) and ``lengths`` are optional (``"optional": true``, Triton's
model-config flag): a sequence keeps its state in the server, and a missing ``lengths`` means full
rows. Triton's tools (perf_analyzer) then send ``x`` alone. The JSON metadata carries the same flag
on those inputs; a protobuf front end drops it, as its ``TensorMetadata`` has no such field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.engine.dataplane import DataPlane
from service.engine.errors import BadRequest
from service.engine.manager import IndexEntry
from service.engine.models import ServedModel
from service.settings import Settings

SERVER_NAME = "rnnserve"
EXTENSIONS = ["binary_tensor_data", "sequence", "model_configuration", "model_repository"]
PLATFORM = "onnxruntime_onnx"


def server_metadata(version: str) -> dict[str, Any]:
    """Server name, version and the protocol extensions served."""
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


def _tensor(
    name: str, dims: list[int], datatype: str = "FP32", optional: bool = False
) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": dims}
    if optional:
        tensor["optional"] = True
    return tensor


def signature(model: ServedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's V2 inputs and outputs (name, datatype, shape with -1 for dynamic sizes, and
    ``"optional": true`` on the inputs a request may leave out)."""
    meta = model.metadata
    state = [meta.num_layers, -1, meta.hidden_size]
    inputs = [_tensor("x", [-1, -1, meta.input_size])]
    inputs += [_tensor(name, state, optional=True) for name in meta.state_inputs]
    inputs.append(_tensor("lengths", [-1], "INT64", optional=True))
    outputs = [_tensor("y", [-1, -1, meta.output_size])]
    outputs += [_tensor(name, state) for name in meta.state_outputs]
    return inputs, outputs


def model_metadata(dataplane: DataPlane, name: str, version: int | None) -> dict[str, Any]:
    """Inputs, outputs and versions of a model (the highest version unless one is named)."""
    model = dataplane.model(name, version)
    versions = [m.version for m in dataplane.repository.versions(name)]
    inputs, outputs = signature(model)
    return {
        "name": name,
        "versions": [str(v) for v in (versions if version is None else [version])],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def model_config(
    dataplane: DataPlane, settings: Settings, name: str, version: int | None
) -> dict[str, Any]:
    """The model's configuration in the shape of Triton's model config (its JSON form)."""
    model = dataplane.model(name, version)
    meta = model.metadata
    inputs, outputs = signature(model)

    def dims(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "name": t["name"],
                "data_type": f"TYPE_{t['datatype']}",
                "dims": t["shape"],
                **({"optional": True} if t.get("optional") else {}),
            }
            for t in tensors
        ]

    return {
        "name": name,
        "version": str(model.version),
        "platform": PLATFORM,
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


def check_load_parameters(names: Iterable[str]) -> None:
    """Refuse Triton's load parameters that override the model's files (``config``, ``file:``)."""
    unsupported = sorted(p for p in names if p == "config" or p.startswith("file:"))
    if unsupported:
        raise BadRequest(
            f"load parameter {unsupported[0]!r} is not supported: the service loads the files "
            "in the model's folder (metadata.json and model.onnx)"
        )


def repository_index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    """Triton's repository index: name, version, state and reason of each model version."""
    return [
        {"name": e.name, "version": str(e.version), "state": e.state.value, "reason": e.reason}
        for e in entries
    ]
