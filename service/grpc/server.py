"""The gRPC server: started and stopped by the app's lifespan, in uvicorn's process and loop.

``grpc.aio`` runs every RPC as a coroutine on the running event loop (asyncio's or uvloop's), so
the gRPC front end shares the data plane, batchers, sessions and V2 sequences with HTTP without a
thread or a lock between them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI

from service.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from service.grpc.servicer import InferenceServicer
from service.settings import Settings
from service.v2.infer import run_infer

logger = logging.getLogger(__name__)


class GrpcPortUnavailable(RuntimeError):
    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"cannot serve gRPC on {address}: {reason}; choose another --grpc-port "
            "(RNNSERVE_GRPC_PORT) or 0 to turn gRPC off"
        )


@dataclass
class GrpcServer:
    server: Any  # grpc.aio.Server
    servicer: InferenceServicer


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start(app: FastAPI, settings: Settings) -> GrpcServer | None:
    """Serve ``inference.GRPCInferenceService`` on ``settings.grpc_port``; None when it is 0.

    Needs ``app.state.dataplane``, ``app.state.v2_sequences`` (the HTTP V2 routes' table, so a
    sequence can be stepped over either protocol) and ``app.state.model_manager``.
    """
    if not settings.grpc_port:
        return None
    infer = functools.partial(run_infer, app.state.dataplane, app.state.v2_sequences)
    servicer = InferenceServicer(
        app.state.dataplane, infer, settings, app.version, app.state.model_manager
    )
    server = grpc.aio.server(
        options=[
            # the same limit as an HTTP body; larger messages fail with RESOURCE_EXHAUSTED
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            # without this a second server on the same port would silently share its traffic
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    where = address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError as exc:
        if "grpc_port" in settings.model_fields_set:  # asked for: serving without it is wrong
            raise GrpcPortUnavailable(where, str(exc)) from None
        # The default port is taken (say, by a second service on another --port): serve HTTP.
        logger.warning("%s; serving without gRPC", GrpcPortUnavailable(where, str(exc)))
        await server.stop(None)
        return None
    await server.start()
    logger.info("serving KServe V2 gRPC on %s", where)
    return GrpcServer(server, servicer)


async def stop(grpc_server: GrpcServer | None, grace_s: float) -> None:
    """Refuse new calls, let streams answer what they read, then stop (at most ``grace_s``)."""
    if grpc_server is None:
        return
    grpc_server.servicer.close()
    await grpc_server.server.stop(grace_s)
