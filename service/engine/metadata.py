"""The service's own view of ``metadata.json``, validated (docs/reference/model-format.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class ModelMetadata(BaseModel):
    """What the service needs from ``metadata.json``; unknown keys are kept for display."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Literal[1]
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1)
    cell: str
    graph: Literal["scan", "native"]
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    input_size: int = Field(ge=1)
    output_size: int = Field(ge=1)
    head: Literal["regression", "multilabel", "classification"]
    state_inputs: list[str] = Field(min_length=1)
    state_outputs: list[str] = Field(min_length=1)
    feature_names: list[str]
    output_names: list[str]
    task: dict[str, Any] = Field(default_factory=dict)
    normalization: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    opset: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: str

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if len(self.state_inputs) != len(self.state_outputs):
            raise ValueError("state_inputs and state_outputs must pair up (same length)")
        if len(self.feature_names) != self.input_size:
            raise ValueError(
                f"feature_names has {len(self.feature_names)} names, input_size {self.input_size}"
            )
        if len(self.output_names) != self.output_size:
            raise ValueError(
                f"output_names has {len(self.output_names)} names, output_size {self.output_size}"
            )
        return self

    @property
    def num_states(self) -> int:
        return len(self.state_inputs)

    def public_dict(self) -> dict[str, Any]:
        """Everything in metadata.json, as JSON-ready values."""
        return self.model_dump(mode="json")
