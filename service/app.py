"""The application factory: ``create_app(settings)`` wires the engine (data plane, model manager)
and the APIs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service.api import docs, errors, rest, ws
from service.api import metrics as metrics_api
from service.api.hot import HotPaths
from service.api.limits import BodySizeLimit
from service.engine.dataplane import DataPlane
from service.engine.manager import ModelManager
from service.engine.metrics import Metrics
from service.engine.sequences import MemorySequences, StoredSequences
from service.engine.sessions import SessionManager
from service.engine.store import make_store
from service.grpc import server as grpc_server
from service.mux import endpoint as mux_endpoint
from service.settings import Settings
from service.ui.files import mount_ui
from service.v2 import repository as v2_repository
from service.v2 import routes as v2_routes
from service.v2.sequences import SequenceTable

DESCRIPTION = """Stateful streaming predictions from recurrent models exported to ONNX.

Open a session, send chunks of observations, get predictions; the recurrent state is carried
between chunks. The same over a websocket at `/v1/stream`. Errors are `{"error": "..."}`.
"""


class ServiceApp(FastAPI):
    """FastAPI, with the per-step endpoints served by raw ASGI handlers ahead of its routing.

    ``service.api.hot`` answers ``POST /v1/sessions/{id}/steps`` and V2 ``infer`` in a fraction
    of the CPU time a routed FastAPI request takes; every other request, and these too when
    ``fast_paths`` is off, goes through FastAPI as usual.
    """

    hot: HotPaths | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None if self.hot is None else self.hot.handler(scope)
        if handler is None:
            await super().__call__(scope, receive, send)
        else:
            scope["app"] = self  # as Starlette sets it: endpoints read the app's state
            await handler(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """Build the app; models load in the background after startup (``/health/ready`` says when)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workers = max(2, os.cpu_count() or 2)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rnnserve-onnx")
        store = make_store(settings)
        durable = store is not None
        sessions = SessionManager(
            settings.max_sessions,
            settings.idle_ttl_s,
            durable=durable,
            max_per_key=settings.max_sessions_per_key,
        )
        dataplane = DataPlane(sessions, settings.max_steps_per_chunk, store, app.state.metrics)
        app.state.dataplane = dataplane
        sequences = MemorySequences(sessions) if store is None else StoredSequences(store)
        app.state.v2_sequences = SequenceTable(sequences)
        models = app.state.model_manager = ModelManager(settings, dataplane, executor)
        if store is not None:
            await store.start()
        models.start()
        sessions.start_sweeper()
        dataplane.start_keepalive()
        grpc_endpoint = None
        try:
            grpc_endpoint = await grpc_server.start(app, settings)
            yield
        finally:
            await grpc_server.stop(grpc_endpoint, settings.shutdown_timeout_s)
            # uvicorn has stopped accepting and waited for open requests; let what is still
            # queued finish (and be stored) before the batchers stop.
            await models.stop_control()
            await dataplane.drain(settings.shutdown_timeout_s)
            await sessions.stop_sweeper()
            await dataplane.stop_keepalive()
            await models.stop()
            if store is not None:
                await store.close()
            executor.shutdown(wait=True, cancel_futures=True)

    app = ServiceApp(
        title="rnnserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # docs.install serves them without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    if settings.fast_paths:
        app.hot = HotPaths(app.state, {"/v1/stream": ws.STREAM, "/v1/mux": mux_endpoint.MUX})
    app.state.metrics = Metrics()
    app.state.metrics.watch(lambda: getattr(app.state, "dataplane", None))
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s
    )
    errors.install(app)
    docs.install(app)
    app.include_router(rest.health)
    app.include_router(rest.api)
    app.include_router(ws.router)
    app.router.routes.append(mux_endpoint.route())
    app.include_router(metrics_api.router)
    app.include_router(v2_routes.health)
    app.include_router(v2_routes.v2)
    app.include_router(v2_repository.router)
    mount_ui(app)
    return app
