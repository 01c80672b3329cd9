"""Service settings: flags and ``RNNSERVE_*`` environment variables, checked at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import onnxruntime as ort
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
StoreKind = Literal["memory", "redis"]
ModelControlMode = Literal["none", "poll", "explicit"]
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
    max_sessions_per_key: int = Field(default=0, ge=0)
    """Most open sessions one API key may hold (in this replica), so that one key cannot take
    every slot; more answer 429. 0 = no per-key limit (it needs api_keys to apply)."""
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
    inline_call_us: float = Field(default=300.0, ge=0)
    """Run a model call on the event loop's own thread while recent calls took less than this
    many microseconds: a hand-off to a worker thread and back costs more CPU than a small
    model's call. Longer calls run in worker threads, so requests are served meanwhile.
    0 = every call in a worker thread."""
    max_queue_depth: int = Field(default=4096, ge=1)
    """Most chunks waiting per model version; more answer 503 with Retry-After."""
    intra_op_threads: int = Field(default=0, ge=0)
    """ONNX Runtime threads per model call; 0 = one on the CPU provider (batches of small models
    gain little from more, and spare cores serve requests), ONNX Runtime's default elsewhere."""
    state_pool: Literal["auto", "host", "device"] = "auto"
    """Where session states live: ``host`` (numpy), ``device`` (OrtValues on the model's device,
    stepped through IOBinding) or ``auto`` (device when the model runs on CUDA, else host)."""
    ws_compression: bool = False
    """Offer permessage-deflate to websocket clients that ask for it. Off by default: steps are
    a few dozen bytes, compression saves little on them and costs CPU and about 64 KiB of
    memory per connection."""
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
    body_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds a request body may take to arrive; a slower or stalled upload answers 408 and its
    connection is closed."""
    mux_max_entries: int = Field(default=65_536, ge=1)
    """Most entries (sessions) in one ``/v1/mux`` step frame, and most sessions opened or
    attached by one control message."""
    fast_paths: bool = True
    """Serve the per-step endpoints (``POST /v1/sessions/{id}/steps``, V2 ``infer``) by raw ASGI
    handlers ahead of FastAPI's routing; false routes them through FastAPI like every other
    endpoint (same answers, more CPU per step; for comparison)."""
    cuda_graphs: bool = True
    """On the CUDA provider with the device state pool, replay single-step batches as CUDA graphs
    (one per batch-size bucket, batches padded up to their bucket); a model that cannot be
    captured logs one line and runs without them. No effect on the CPU provider."""
    cuda_tf32: bool = False
    """Let the CUDA provider compute float32 matmuls in TF32 (faster on Ampere and newer, about
    1e-3 relative error); off, outputs equal the CPU provider's to about 1e-5."""
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

    model_control_mode: ModelControlMode = "none"
    """How the served models follow the models folder, as in Triton: none (load every valid version
    at startup, then never change), poll (re-read the folder every repository_poll_s seconds) or
    explicit (load and unload through POST /v2/repository/models/{name}/load and /unload)."""
    repository_poll_s: float = Field(default=5.0, gt=0)
    """Seconds between two reads of the models folder with model_control_mode poll."""

    @field_validator("model_control_mode", mode="before")
    @classmethod
    def _lower_case_mode(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value  # Triton writes EXPLICIT, POLL

    @model_validator(mode="after")
    def _poll_interval_needs_poll_mode(self) -> Settings:
        if "repository_poll_s" in self.model_fields_set and self.model_control_mode != "poll":
            raise ValueError(
                "repository_poll_s applies only with model_control_mode poll "
                f"(model_control_mode is {self.model_control_mode})"
            )
        return self


@dataclass(frozen=True)
class SettingDoc:
    """One setting as ``python -m service --help`` and the settings reference show it."""

    name: str  # the field name, e.g. max_batch_size
    flag: str  # --max-batch-size
    env: str  # RNNSERVE_MAX_BATCH_SIZE
    kind: str  # the accepted values, e.g. "integer >= 1" or "auto, host or device"
    default: str  # as it would be written on the command line; "" for none
    doc: str  # the field's docstring, on one line


def describe_settings() -> list[SettingDoc]:
    """Every setting of :class:`Settings`, in declaration order: the one source of their docs."""
    prefix = Settings.model_config.get("env_prefix", "")
    return [
        SettingDoc(
            name=name,
            flag="--" + name.replace("_", "-"),
            env=f"{prefix}{name.upper()}",
            kind=_kind(field.annotation, field.metadata),
            default=_shown(field.default),
            doc=" ".join((field.description or "").split()),
        )
        for name, field in Settings.model_fields.items()
    ]


_TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "true or false", Path: "path"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _kind(annotation: object, metadata: list[object]) -> str:
    if get_origin(annotation) is Literal:
        values = [str(v) for v in get_args(annotation)]
        return ", ".join(values[:-1]) + " or " + values[-1]
    if get_origin(annotation) is list:
        return "comma-separated list"
    kind = _TYPE_NAMES.get(annotation, str(annotation))  # type: ignore[call-overload]
    bounds = [
        f"{sign} {getattr(m, attr)}"
        for m in metadata
        for attr, sign in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    return ", ".join([kind, *bounds])


def _shown(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return ",".join(str(item) for item in default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)
