"""Response bodies of the V2 endpoints, as shown with examples at ``/docs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel


def _example(example: Any) -> ConfigDict:  # a JSON object, or a list for a RootModel
    return ConfigDict(json_schema_extra={"examples": [example]})


class Live(BaseModel):
    model_config = _example({"live": True})
    live: bool


class Ready(BaseModel):
    model_config = _example({"ready": True})
    ready: bool


class ModelReady(BaseModel):
    model_config = _example({"name": "co2-forecaster", "ready": True})
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    model_config = _example(
        {
            "name": "rnnserve",
            "version": "0.1.0",
            "extensions": [
                "binary_tensor_data",
                "sequence",
                "model_configuration",
                "model_repository",
            ],
        }
    )
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    optional: bool | None = None  # true on inputs a request may leave out (h0, c0, lengths)


class ModelMetadata(BaseModel):
    model_config = _example(
        {
            "name": "co2-forecaster",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 1]}],
        }
    )
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelConfig(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "name": "co2-forecaster",
                    "platform": "onnxruntime_onnx",
                    "max_batch_size": 0,
                    "sequence_batching": {"max_sequence_idle_microseconds": 600000000},
                }
            ]
        },
    )
    name: str
    platform: str


class InferResponse(BaseModel):
    """The JSON form; with binary outputs the JSON header is followed by the tensors' bytes."""

    model_config = _example(
        {
            "model_name": "co2-forecaster",
            "model_version": "1",
            "parameters": {"sequence_id": 42, "session_id": "Jd0t3Yq4...", "step_count": 3},
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1, 1], "data": [316.4]}],
        }
    )
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[dict[str, Any]]


INFER_REQUEST_EXAMPLE = {
    "requestBody": {
        "content": {
            "application/json": {
                "example": {
                    "parameters": {"sequence_id": 42, "sequence_start": True},
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [1, 2, 1],
                            "datatype": "FP32",
                            "data": [315.4, 315.9],
                        }
                    ],
                    "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
                }
            }
        },
        "required": True,
    }
}


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str  # READY, LOADING, UNLOADING or UNAVAILABLE
    reason: str


class RepositoryIndex(RootModel[list[RepositoryIndexEntry]]):
    model_config = _example(
        [
            {"name": "co2-forecaster", "version": "1", "state": "READY", "reason": ""},
            {
                "name": "co2-forecaster",
                "version": "2",
                "state": "UNAVAILABLE",
                "reason": "sha256 of model.onnx is 3f1c..., metadata.json records 9b2e...",
            },
        ]
    )


def body_example(example: dict[str, Any]) -> dict[str, Any]:
    """An optional JSON request body with an example, for ``openapi_extra``."""
    return {
        "requestBody": {
            "content": {"application/json": {"example": example}},
            "required": False,
        }
    }
