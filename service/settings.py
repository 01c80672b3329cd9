"""Service settings: flags and ``RNNSERVE_*`` environment variables, checked at startup."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import onnxruntime as ort
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
StoreKind = Literal["memory", "redis"]
REDIS_SCHEMES = ("redis", "rediss", "unix")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every option of the service; each is also the environment variable ``RNNSERVE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="RNNSERVE_", frozen=True, use_attribute_docstrings=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""
    models_dir: Path = Path("models")
    """Folder holding ``<name>/<version>/{model.onnx, metadata.json}``."""
    providers: Annotated[list[str], NoDecode] = [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    """ONNX Runtime execution providers in order of preference (comma-separated)."""
    max_sessions: int = Field(default=100_000, ge=1)
    """Most open streaming sessions, all models together; more answer 503."""
    idle_ttl_s: float = Field(default=600.0, ge=0)
    """Seconds a session may stay idle (no step, no websocket) before it expires; 0 = never."""
    max_steps_per_chunk: int = Field(default=4096, ge=1)
    """Most time steps in one chunk (a step request, frame or predicted sequence); more: 413."""
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body or websocket message in bytes; larger: 413 (websocket: close 1009)."""
    api_keys: Annotated[list[str], NoDecode] = []
    """Accepted API keys (comma-separated); empty = no authentication."""
    log_level: LogLevel = "info"
    """Log level of the service and uvicorn."""
    access_log: bool = False
    """Log one line per HTTP request (uvicorn's access log, at level info); off by default, as it
    costs about a tenth of the CPU time of a step request."""
    max_batch_size: int = Field(default=256, ge=1)
    """Most chunks (from different sessions) in one ONNX Runtime call."""
    max_batch_delay_ms: float = Field(default=0.0, ge=0)
    """How long a batch waits to fill after its first chunk; 0 = run when the previous one ends."""
    max_queue_depth: int = Field(default=4096, ge=1)
    """Most chunks waiting per model version; more answer 503 with Retry-After."""
    intra_op_threads: int = Field(default=0, ge=0)
    """ONNX Runtime threads per model call; 0 = one on the CPU provider (batches of small models
    gain little from more, and spare cores serve requests), ONNX Runtime's default elsewhere."""
    state_pool: Literal["auto", "host", "device"] = "auto"
    """Where session states live: ``host`` (numpy), ``device`` (OrtValues on the model's device,
    stepped through IOBinding) or ``auto`` (device when the model runs on CUDA, else host)."""
    ws_ping_interval_s: float = Field(default=20.0, gt=0)
    """Seconds between websocket keepalive pings (a peer that stops answering is dropped)."""
    session_store: StoreKind = "memory"
    """Where session states live: memory (this process) or redis (shared, survives restarts)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL of the redis session store (redis://, rediss:// or unix://)."""
    redis_key_prefix: str = "rnnserve:"
    """Prefix of every Redis key the service writes."""
    redis_timeout_s: float = Field(default=0.5, gt=0)
    """Connect and reply timeout for Redis; past it a request fails with 503."""
    shutdown_timeout_s: int = Field(default=10, ge=0)
    """On SIGTERM, seconds for requests and batches in flight to finish; then they are cancelled."""
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """TCP port of the KServe V2 / Triton gRPC endpoint, on the same host and in the same process
    as HTTP; 0 = no gRPC."""

    @field_validator("providers", "api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one execution provider is needed")
        known = ort.get_all_providers()
        unknown = [p for p in value if p not in known]
        if unknown:
            raise ValueError(f"unknown execution provider(s) {unknown}; known: {', '.join(known)}")
        return value

    @field_validator("models_dir")
    @classmethod
    def _models_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"models folder {str(value)!r} does not exist or is not a folder")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in REDIS_SCHEMES:
            shown = value.split("@")[-1]  # never echo a password
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://: {shown!r}")
        return value

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Settings:
        if self.max_batch_size > self.max_queue_depth:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed "
                f"max_queue_depth ({self.max_queue_depth})"
            )
        return self

    @model_validator(mode="after")
    def _grpc_port_is_not_the_http_port(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port ({self.grpc_port}) must differ from port; 0 turns gRPC off"
            )
        return self

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0
