"""Triton's model repository extension over HTTP: the index, and loading and unloading models.

A thin layer over ``service.engine.manager.ModelManager``, which the gRPC front end calls too.
Bodies are optional JSON objects, as ``tritonclient`` sends them: the index takes
``{"ready": bool}``, load and unload ``{"parameters": {...}}``. Load and unload answer 200 with an
empty body, as Triton does; with API keys set, every call needs one, like every ``/v2`` route.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api.responses import OrjsonResponse
from service.api.rest import get_caller
from service.engine.errors import BadRequest
from service.engine.manager import ModelManager
from service.v2 import describe, schemas

router = APIRouter(prefix="/v2/repository", tags=["v2"], dependencies=[Depends(get_caller)])

DONE: dict[int | str, dict[str, Any]] = {200: {"description": "done (empty body, as in Triton)"}}


async def get_manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.model_manager
    return manager


Manager = Annotated[ModelManager, Depends(get_manager)]


@router.post(
    "/index",
    response_model=schemas.RepositoryIndex,
    openapi_extra=schemas.body_example({"ready": False}),
)
async def index(request: Request, manager: Manager) -> Response:
    """Every model version in the models folder or in service: READY, LOADING, UNLOADING or
    UNAVAILABLE, and why (``{"ready": true}`` lists only the ready ones)."""
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest(f"'ready' must be true or false, got {ready!r}")
    return OrjsonResponse(describe.repository_index(manager.index(ready_only=ready)))


@router.post("/models/{name}/load", response_class=Response, responses=DONE)
async def load(name: str, request: Request, manager: Manager) -> Response:
    """Load or reload the model from its folder (``--model-control-mode explicit`` only): new
    versions load, changed ones reload, removed ones unload; a broken version is refused with its
    reason (400) while the others serve."""
    describe.check_load_parameters(_parameters(await _body(request)))
    await manager.load(name)
    return Response(status_code=200)


@router.post("/models/{name}/unload", response_class=Response, responses=DONE)
async def unload(name: str, request: Request, manager: Manager) -> Response:
    """Unload every version of the model (``--model-control-mode explicit`` only); answers once
    the steps in flight have finished and its sessions have ended."""
    _parameters(await _body(request))  # unload_dependents: a model here has no dependents
    await manager.unload(name)
    return Response(status_code=200)


async def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is an empty object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("'parameters' must be a JSON object")
    return parameters
