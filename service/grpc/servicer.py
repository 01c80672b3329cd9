"""``inference.GRPCInferenceService``: the KServe V2 RPCs on the same V2 core as HTTP.

A thin layer, like the HTTP routes: each RPC checks the caller's key, calls the data plane or
``run_infer`` and translates the result (``service.grpc.codec``) or the error
(``service.grpc.status``). Health RPCs need no key, as on HTTP; every other RPC reads it from the
``authorization: Bearer <key>`` metadata when the service has keys.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import grpc

from service.api.auth import identify
from service.engine.dataplane import DataPlane
from service.engine.errors import NotFound, NotReady, ServiceError, internal_error
from service.engine.manager import ModelManager
from service.grpc import codec
from service.grpc.proto import grpc_service_pb2 as pb
from service.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from service.grpc.status import status_of
from service.grpc.stream import InferStream
from service.settings import Settings
from service.v2 import describe
from service.v2.codec import InferRequest
from service.v2.infer import InferResult

logger = logging.getLogger(__name__)

#: ``run_infer`` with its data plane and sequence table bound: (model, version, request, caller)
Infer = Callable[[str, int | None, InferRequest, str | None], Awaitable[InferResult]]
Request = TypeVar("Request")
Response = TypeVar("Response")
Rpc = Callable[[Any, Request, Any], Coroutine[Any, Any, Response]]

ModelRequest = pb.ModelReadyRequest | pb.ModelMetadataRequest | pb.ModelConfigRequest
SHUTTING_DOWN = "the server is shutting down; open a new stream (to another replica) and resume"


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (``context.abort`` raises to do so)."""
    await context.abort(code, message)
    raise AssertionError("context.abort always raises")


def reported(rpc: Rpc[Request, Response]) -> Rpc[Request, Response]:
    """End a unary RPC that raised with the error's status and message (HTTP's wording)."""

    @functools.wraps(rpc)
    async def call(self: Any, request: Request, context: Any) -> Response:
        try:
            return await rpc(self, request, context)
        except ServiceError as exc:
            await abort(context, status_of(exc), exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: logged here, the client gets no traceback
            logger.exception("unhandled error in %s", rpc.__name__)
            await abort(context, grpc.StatusCode.INTERNAL, internal_error(exc))

    return call


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs rnnserve serves; the others answer UNIMPLEMENTED."""

    def __init__(
        self,
        dataplane: DataPlane,
        infer: Infer,
        settings: Settings,
        version: str,
        manager: ModelManager | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._manager = manager  # None: the repository RPCs answer UNIMPLEMENTED
        self._infer = infer
        self._settings = settings
        self._version = version
        self._readers: set[asyncio.Task[None]] = set()  # each open stream's reading task
        self._background: set[asyncio.Task[None]] = set()  # abandoned streams finishing up
        self._closing = False

    def close(self) -> None:
        """Stop reading every stream; each answers what it read, then ends with UNAVAILABLE."""
        self._closing = True
        for reader in self._readers:
            reader.cancel()

    def _caller(self, context: Any) -> str | None:
        if not self._settings.api_keys:
            return None  # as on HTTP: without keys the header is ignored
        authorization = next(
            (value for key, value in context.invocation_metadata() if key == "authorization"),
            None,
        )
        return identify(self._settings.api_keys, authorization)

    def _version_asked(self, request: ModelRequest, context: Any) -> int | None:
        """Check the caller's key, then read the request's model version (empty: None)."""
        self._caller(context)
        return codec.model_version(request.version)

    # -- health and metadata ----------------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready)

    @reported
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        self._caller(context)
        return pb.ServerMetadataResponse(**describe.server_metadata(self._version))

    @reported
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        """Ready false (not NOT_FOUND) for an unknown model or version, as Triton answers."""
        version = self._version_asked(request, context)
        try:
            self._dataplane.model(request.name, version)
        except (NotFound, NotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @reported
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        version = self._version_asked(request, context)
        return codec.model_metadata(describe.model_metadata(self._dataplane, request.name, version))

    @reported
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        version = self._version_asked(request, context)
        config = describe.model_config(self._dataplane, self._settings, request.name, version)
        return pb.ModelConfigResponse(config=codec.model_config(config))

    # -- the model repository (Triton's extension; HTTP's /v2/repository) ----------------------
    @reported
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        manager = await self._repository(context)
        entries = describe.repository_index(manager.index(ready_only=request.ready))
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in entries]
        )

    @reported
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        manager = await self._repository(context)
        describe.check_load_parameters(request.parameters.keys())
        await manager.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @reported
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        manager = await self._repository(context)
        await manager.unload(request.model_name)  # unload_dependents: nothing depends on a model
        return pb.RepositoryModelUnloadResponse()

    async def _repository(self, context: Any) -> ModelManager:
        """Check the caller's key; the model manager (UNIMPLEMENTED when there is none)."""
        self._caller(context)
        if self._manager is None:
            await abort(context, grpc.StatusCode.UNIMPLEMENTED, "no model repository here")
        return self._manager

    # -- inference --------------------------------------------------------------------------
    @reported
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        result = await self._run(request, self._caller(context))
        response = pb.ModelInferResponse()
        codec.fill_response(response, request, result)
        return response

    async def _run(self, request: pb.ModelInferRequest, caller: str | None) -> InferResult:
        version = codec.model_version(request.model_version)
        decoded = codec.decode_request(request)
        return await self._infer(request.model_name, version, decoded, caller)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> None:
        """Answer every request of the stream; see ``service.grpc.stream`` for the semantics."""
        try:
            caller = self._caller(context)
        except ServiceError as exc:  # the key covers the whole stream
            await abort(context, status_of(exc), exc.message)
        if self._closing:
            await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        stream = InferStream(functools.partial(self._answer, caller=caller), context)
        reader = asyncio.ensure_future(stream.read(requests))
        self._readers.add(reader)
        try:
            await stream.write()
        except asyncio.CancelledError:  # the client cancelled: finish what was read, unseen
            reader.cancel()
            self._finish_in_background(stream)
            raise
        finally:
            self._readers.discard(reader)
        if not reader.cancelled() and reader.exception() is not None:
            logger.debug("stream ended by its transport: %r", reader.exception())
        if self._closing:
            await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _answer(
        self, request: pb.ModelInferRequest, caller: str | None
    ) -> pb.ModelStreamInferResponse:
        """One request's stream response: its result, or its error in ``error_message``."""
        answer = pb.ModelStreamInferResponse()
        try:
            result = await self._run(request, caller)
        except ServiceError as exc:
            return _stream_error(answer, request, exc.message)
        except Exception as exc:  # a bug: logged here, the stream goes on
            logger.exception("unhandled error in ModelStreamInfer")
            return _stream_error(answer, request, internal_error(exc))
        codec.fill_response(answer.infer_response, request, result)
        if _wants_final_flag(request):
            answer.infer_response.parameters["triton_final_response"].bool_param = True
        return answer

    def _finish_in_background(self, stream: InferStream) -> None:
        task = asyncio.ensure_future(stream.drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _stream_error(
    answer: pb.ModelStreamInferResponse, request: pb.ModelInferRequest, message: str
) -> pb.ModelStreamInferResponse:
    answer.error_message = message
    answer.infer_response.model_name = request.model_name
    answer.infer_response.model_version = request.model_version
    answer.infer_response.id = request.id
    return answer


def _wants_final_flag(request: pb.ModelInferRequest) -> bool:
    """tritonclient's ``enable_empty_final_response``: mark the (only) response as final."""
    flag = request.parameters.get("triton_enable_empty_final_response")
    return flag is not None and flag.bool_param
