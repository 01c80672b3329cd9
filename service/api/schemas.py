"""Request and response bodies of the REST API, with the examples shown at ``/docs``.

Values inside ``inputs`` are checked by the data plane (so REST and websocket give the same
messages); the schemas here document their shape.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

STEPS_SCHEMA = {
    "type": "array",
    "items": {"type": "array", "items": {"type": "number"}},
    "description": "T steps, each a list of input_size numbers (a single step may be a flat list)",
}
SEQUENCES_SCHEMA = {"type": "array", "items": STEPS_SCHEMA, "description": "whole sequences"}

Steps = Annotated[list[Any], WithJsonSchema(STEPS_SCHEMA)]
Sequences = Annotated[list[Any], WithJsonSchema(SEQUENCES_SCHEMA)]


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str = Field(examples=["model 'nope' not found; available models: co2-forecaster"])
    step_count: int | None = Field(
        default=None,
        description="with 409 for a step-count mismatch, and with 503 when a step's outcome is "
        "unknown: the session's current (or last known) step count",
    )


class CreateSession(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"model": "co2-forecaster"}]}
    )

    model: str = Field(description="model name")
    version: int | None = Field(default=None, description="model version; default: the highest")


class StepBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": [[315.4], [315.9], [316.2]], "expected_step_count": 12}]
        },
    )

    inputs: Steps
    expected_step_count: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="the step count the session must be at, or the step is not applied and the "
        "answer is 409 with the session's `step_count` (safe retries); default: no check",
    )


class PredictBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[[315.4], [315.9], [316.2]], [[320.1]]]}]},
    )

    inputs: Sequences
    version: int | None = Field(default=None, description="model version; default: the highest")
    initial_states: list[dict[str, Any]] | None = Field(
        default=None,
        description="one state per sequence, {state_input_name: [[hidden_size numbers] per "
        "layer]}; default: zeros",
    )


class SessionBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "Jd0t3Yq4l9cJm1vJ2n0xw3H9s8V6QWcT",
                    "model": "co2-forecaster",
                    "version": 1,
                    "state": "open",
                    "step_count": 0,
                    "created_at": 1790000000.0,
                    "idle_s": 0.0,
                }
            ]
        }
    )

    session_id: str
    model: str
    version: int
    state: str
    step_count: int
    created_at: float
    idle_s: float


class StepResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"outputs": [[315.9], [316.1], [316.6]], "step_count": 3}]}
    )

    outputs: list[list[float]]
    step_count: int


class PredictResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "co2-forecaster",
                    "version": 1,
                    "outputs": [[[315.9], [316.1], [316.6]], [[320.4]]],
                    "states": [{"hn": [[0.1, -0.2]]}, {"hn": [[0.3, 0.0]]}],
                }
            ]
        }
    )

    model: str
    version: int
    outputs: list[list[list[float]]]
    states: list[dict[str, list[list[float]]]]


class ModelDescription(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "name": "co2-forecaster",
                    "version": 1,
                    "cell": "gru",
                    "input_size": 1,
                    "output_size": 1,
                    "provider": "CPUExecutionProvider",
                    "providers": ["CPUExecutionProvider"],
                }
            ]
        },
    )

    name: str
    version: int
    provider: str = Field(description="the ONNX Runtime execution provider in use")
    providers: list[str]


class ModelList(BaseModel):
    models: list[ModelDescription]


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: str


class Stats(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "sessions": 12,
                    "models": [
                        {
                            "model": "co2-forecaster",
                            "version": 1,
                            "batches": 340,
                            "batch_size_mean": 7.5,
                            "batch_size_max": 12,
                            "queue_delay_ms": {"p50": 0.2, "p90": 0.5, "p99": 1.1, "max": 2.0},
                            "step_latency_ms": {"p50": 0.6, "p90": 1.0, "p99": 2.3, "max": 4.0},
                        }
                    ],
                }
            ]
        },
    )

    sessions: int
    models: list[dict[str, Any]]
