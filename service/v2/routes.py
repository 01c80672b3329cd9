"""The Open Inference Protocol (KServe V2) with Triton's sequence and binary-tensor extensions.

A thin layer: it decodes V2 requests into data-plane calls and encodes the results back. Statuses
follow Triton's mapping: every invalid argument is 400 (where the native API says 413 or 422),
unknown models 404, unavailable 503.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from service.api.responses import OrjsonResponse
from service.api.rest import Caller, Plane, get_caller
from service.engine.dataplane import DataPlane
from service.engine.errors import BadRequest, NotReady, PayloadTooLarge
from service.v2 import describe, schemas
from service.v2.codec import HEADER_LENGTH, InferRequest, decode_request, encode_response
from service.v2.infer import run_infer
from service.v2.sequences import SequenceTable

health = APIRouter(prefix="/v2/health", tags=["v2"])
v2 = APIRouter(prefix="/v2", tags=["v2"], dependencies=[Depends(get_caller)])


def get_sequences(request: Request) -> SequenceTable:
    """The app's table of open V2 sequences (created with the app)."""
    table: SequenceTable = request.app.state.v2_sequences
    return table


Sequences = Annotated[SequenceTable, Depends(get_sequences)]


@health.get("/live", response_model=schemas.Live)
async def live() -> Response:
    """The process is up (Triton: ``is_server_live``)."""
    return OrjsonResponse({"live": True})


@health.get("/ready", response_model=schemas.Ready)
async def ready(dataplane: Plane) -> Response:
    """Ready once the models are loaded (Triton: ``is_server_ready``)."""
    if not dataplane.ready:
        raise NotReady()
    return OrjsonResponse({"ready": True})


@v2.get("", response_model=schemas.ServerMetadata)
async def server_metadata(request: Request) -> Response:
    """Server name, version and the protocol extensions served."""
    return OrjsonResponse(describe.server_metadata(request.app.version))


@v2.get("/models/{name}", response_model=schemas.ModelMetadata)
@v2.get("/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
async def model_metadata(name: str, dataplane: Plane, version: int | None = None) -> Response:
    """Inputs, outputs and versions of a model (the highest version unless one is named)."""
    return OrjsonResponse(describe.model_metadata(dataplane, name, version))


@v2.get("/models/{name}/ready", response_model=schemas.ModelReady)
@v2.get("/models/{name}/versions/{version}/ready", response_model=schemas.ModelReady)
async def model_ready(name: str, dataplane: Plane, version: int | None = None) -> Response:
    """200 when the model version is loaded and serving; 404 for an unknown one."""
    dataplane.model(name, version)
    return OrjsonResponse({"name": name, "ready": True})


@v2.get("/models/{name}/config", response_model=schemas.ModelConfig)
@v2.get("/models/{name}/versions/{version}/config", response_model=schemas.ModelConfig)
async def model_config(
    name: str, request: Request, dataplane: Plane, version: int | None = None
) -> Response:
    """The model's configuration in the shape of Triton's model config (JSON)."""
    settings = request.app.state.settings
    return OrjsonResponse(describe.model_config(dataplane, settings, name, version))


INFER: dict[str, Any] = {
    "response_model": schemas.InferResponse,
    "openapi_extra": schemas.INFER_REQUEST_EXAMPLE,
}


@v2.post("/models/{name}/infer", **INFER)
@v2.post("/models/{name}/versions/{version}/infer", **INFER)
async def infer(
    name: str,
    request: Request,
    dataplane: Plane,
    sequences: Sequences,
    caller: Caller,
    version: int | None = None,
) -> Response:
    """Run ``x`` (FP32 [batch, time, input_size]); with ``sequence_id`` the state carries over.

    Served by ``service.api.hot`` ahead of FastAPI's routing unless ``fast_paths`` is off; both
    call ``infer_response``.
    """
    encoding = request.headers.get("content-encoding")
    length = request.headers.get(HEADER_LENGTH)
    limit = request.app.state.settings.max_request_bytes
    body = decompress(await request.body(), encoding, limit)
    content, headers = await infer_response(
        dataplane, sequences, name, version, decode_request(body, length), caller
    )
    return Response(content=content, headers=headers)


async def infer_response(
    dataplane: DataPlane,
    sequences: SequenceTable,
    name: str,
    version: int | None,
    request: InferRequest,
    caller: str | None,
) -> tuple[bytes, dict[str, str]]:
    """Run a decoded request; return the response body and its headers (HTTP front ends)."""
    result = await run_infer(dataplane, sequences, name, version, request, caller)
    header: dict[str, Any] = {"model_name": name, "model_version": str(result.model.version)}
    if request.id is not None:
        header["id"] = request.id
    header["parameters"] = result.parameters
    return encode_response(header, result.outputs, request)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a ``Content-Encoding`` of gzip or deflate, bounded by the request size ``limit``."""
    encoding = (encoding or "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"decompressed request body is larger than {limit} bytes")
    return data
