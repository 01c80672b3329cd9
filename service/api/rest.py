"""The HTTP/JSON API: each endpoint parses its request, calls the data plane, renders the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from service.api import schemas
from service.api.auth import identify
from service.api.responses import OrjsonResponse
from service.engine.dataplane import DataPlane, SequenceOutput, SessionInfo
from service.engine.errors import NotReady
from service.engine.models import ServedModel

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in {
        400: "malformed JSON, non-numeric, NaN or infinite values",
        401: "missing or wrong API key",
        404: "unknown model, version or session, or an expired session",
        408: "the request body did not arrive in time (the connection is closed)",
        409: "the session is not in a state that allows this, or it is not at the "
        "expected_step_count (the body then carries its step_count)",
        413: "request body or chunk over the limit",
        422: "wrong shapes: feature count, empty inputs, missing fields",
        503: "not ready, too many sessions or queue full (with Retry-After)",
    }.items()
}


# The dependencies are ``async def`` although they never wait: FastAPI runs a plain ``def``
# dependency in a worker thread, a thread round trip per request for a dictionary lookup.


async def get_dataplane(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    return dataplane


async def get_caller(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> str | None:
    """The caller's API key (None when the service has no keys); 401 without a valid one."""
    return identify(request.app.state.settings.api_keys, authorization)


Plane = Annotated[DataPlane, Depends(get_dataplane)]
Caller = Annotated[str | None, Depends(get_caller)]

health = APIRouter(prefix="/health", tags=["health"])
api = APIRouter(prefix="/v1", responses=ERRORS, dependencies=[Depends(get_caller)])


@health.get("/live", response_model=schemas.Health)
async def live() -> Response:
    """The process is up."""
    return OrjsonResponse({"status": "live"})


@health.get("/ready", response_model=schemas.Health, responses={503: ERRORS[503]})
async def ready(dataplane: Plane) -> Response:
    """Ready once the models are loaded (at least one model version serves)."""
    if not dataplane.ready:
        raise NotReady()
    return OrjsonResponse({"status": "ready"})


@api.get("/models", response_model=schemas.ModelList, tags=["models"])
async def list_models(dataplane: Plane) -> Response:
    """Every served model version: its metadata and the execution provider in use."""
    return OrjsonResponse({"models": dataplane.list_models()})


@api.get("/models/{name}", response_model=schemas.ModelList, tags=["models"])
async def model_versions(name: str, dataplane: Plane) -> Response:
    """Every served version of one model."""
    return OrjsonResponse({"models": dataplane.model_versions(name)})


@api.get(
    "/models/{name}/versions/{version}", response_model=schemas.ModelDescription, tags=["models"]
)
async def model_version(name: str, version: int, dataplane: Plane) -> Response:
    """One model version: metadata.json plus the execution provider in use."""
    return OrjsonResponse(dataplane.model(name, version).describe())


@api.post("/models/{name}/predict", response_model=schemas.PredictResult, tags=["models"])
async def predict(name: str, body: schemas.PredictBody, dataplane: Plane) -> Response:
    """Stateless: run whole sequences (ragged allowed) and return each one's outputs and final
    state. Each sequence starts from zeros or from its entry in ``initial_states``."""
    model = dataplane.model(name, body.version)
    states = None
    if body.initial_states is not None:
        states = [
            dataplane.parse_state(model, s, f"initial_states[{i}]")
            for i, s in enumerate(body.initial_states)
        ]
    model, results = await dataplane.predict(
        name, body.inputs, version=model.version, initial_states=states
    )
    return OrjsonResponse(_prediction(model, results))


def _prediction(model: ServedModel, results: list[SequenceOutput]) -> dict[str, Any]:
    names = model.metadata.state_outputs
    return {
        "model": model.name,
        "version": model.version,
        "outputs": [r.outputs for r in results],
        "states": [dict(zip(names, r.state, strict=True)) for r in results],
    }


def _session(info: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "model": info.model,
        "version": info.version,
        "state": info.state.value,
        "step_count": info.step_count,
        "created_at": info.created_at,
        "idle_s": info.idle_s,
    }


@api.post("/sessions", status_code=201, response_model=schemas.SessionBody, tags=["sessions"])
async def create_session(body: schemas.CreateSession, dataplane: Plane, caller: Caller) -> Response:
    """Open a streaming session on a model version (default: the highest)."""
    info = await dataplane.create_session(body.model, body.version, caller)
    return OrjsonResponse(_session(info), status_code=201)


@api.get("/sessions/{session_id}", response_model=schemas.SessionBody, tags=["sessions"])
async def get_session(session_id: str, dataplane: Plane, caller: Caller) -> Response:
    """A session's model, state and step count."""
    return OrjsonResponse(_session(await dataplane.session_info(session_id, caller)))


@api.post("/sessions/{session_id}/steps", response_model=schemas.StepResult, tags=["sessions"])
async def step(
    session_id: str, body: schemas.StepBody, dataplane: Plane, caller: Caller
) -> Response:
    """Feed the next chunk of T observations; the state carries over from the previous chunk.

    Served by ``service.api.hot`` ahead of FastAPI's routing unless ``fast_paths`` is off."""
    result = await dataplane.step(
        session_id, body.inputs, caller, expected_step_count=body.expected_step_count
    )
    return OrjsonResponse({"outputs": result.outputs, "step_count": result.step_count})


@api.post("/sessions/{session_id}/reset", response_model=schemas.SessionBody, tags=["sessions"])
async def reset_session(session_id: str, dataplane: Plane, caller: Caller) -> Response:
    """Zero the session's state and step count."""
    return OrjsonResponse(_session(await dataplane.reset(session_id, caller)))


@api.delete("/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(session_id: str, dataplane: Plane, caller: Caller) -> Response:
    """Close the session and free its state."""
    await dataplane.delete(session_id, caller)
    return Response(status_code=204)


@api.get("/stats", response_model=schemas.Stats, tags=["observability"])
async def stats(dataplane: Plane) -> Response:
    """Batches run, batch sizes, queue delay and step latency percentiles per model version."""
    return OrjsonResponse(dataplane.stats())
