"""The application factory: ``create_app(settings)`` wires registry, runtimes, batchers and APIs."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import errors, rest, ws
from service.api import metrics as metrics_api
from service.api.limits import BodySizeLimit
from service.engine.batcher import Batcher
from service.engine.dataplane import DataPlane
from service.engine.device_pool import DevicePool, StateLayout
from service.engine.metrics import Metrics
from service.engine.models import ModelRepository, ServedModel
from service.engine.registry import ModelSpec, scan_models_dir
from service.engine.runtime import ModelRuntime
from service.engine.sessions import SessionManager
from service.engine.state_pool import SlotPool, StatePool
from service.engine.store import make_store
from service.grpc import server as grpc_server
from service.settings import Settings
from service.v2 import routes as v2_routes
from service.v2.sequences import SequenceTable

logger = logging.getLogger(__name__)

DESCRIPTION = """Stateful streaming predictions from recurrent models exported to ONNX.

Open a session, send chunks of observations, get predictions; the recurrent state is carried
between chunks. The same over a websocket at `/v1/stream`. Errors are `{"error": "..."}`.
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the app; models load in the background after startup (``/health/ready`` says when)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workers = max(2, os.cpu_count() or 2)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rnnserve-onnx")
        store = make_store(settings)
        durable = store is not None
        sessions = SessionManager(settings.max_sessions, settings.idle_ttl_s, durable=durable)
        dataplane = DataPlane(sessions, settings.max_steps_per_chunk, store, app.state.metrics)
        app.state.dataplane = dataplane
        if store is not None:
            await store.start()
        loader = asyncio.create_task(load_models(settings, dataplane, executor), name="load")
        sessions.start_sweeper()
        grpc_endpoint = None
        try:
            grpc_endpoint = await grpc_server.start(app, settings)
            yield
        finally:
            await grpc_server.stop(grpc_endpoint, settings.shutdown_timeout_s)
            # uvicorn has stopped accepting and waited for open requests; let what is still
            # queued finish (and be stored) before the batchers stop.
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await dataplane.drain(settings.shutdown_timeout_s)
            await sessions.stop_sweeper()
            for model in dataplane.served_models():
                await model.batcher.stop()
            if store is not None:
                await store.close()
            executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="rnnserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.metrics.watch(lambda: getattr(app.state, "dataplane", None))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    errors.install(app)
    app.include_router(rest.health)
    app.include_router(rest.api)
    app.include_router(ws.router)
    app.include_router(metrics_api.router)
    app.state.v2_sequences = SequenceTable()
    app.include_router(v2_routes.health)
    app.include_router(v2_routes.v2)
    return app


async def load_models(settings: Settings, dataplane: DataPlane, executor: Executor) -> None:
    """Validate and load every model version off the event loop, then start their batchers."""
    loop = asyncio.get_running_loop()
    specs, _ = await loop.run_in_executor(executor, scan_models_dir, settings.models_dir)
    models = []
    for spec in specs:
        try:
            runtime = await loop.run_in_executor(executor, _runtime, spec, settings)
            pool = await loop.run_in_executor(executor, _pool, runtime, settings)
        except Exception as exc:  # ONNX Runtime raises several types for a graph it cannot load
            logger.error("skipping model %s: ONNX Runtime cannot load it: %s", spec.onnx_path, exc)
            continue
        models.append(_serve(runtime, pool, settings, executor))
    for model in models:
        dataplane.metrics.observe_batches(model)
        model.batcher.start()
        logger.info("serving %s/%s on %s", model.name, model.version, model.provider)
    dataplane.set_repository(ModelRepository(models))
    if not models:
        logger.error("no model loaded from %s; the service stays unready", settings.models_dir)


def _runtime(spec: ModelSpec, settings: Settings) -> ModelRuntime:
    return ModelRuntime(spec, settings.providers, settings.intra_op_threads)


def _pool(runtime: ModelRuntime, settings: Settings) -> SlotPool:
    """The state pool ``settings.state_pool`` asks for: on CUDA, ``auto`` keeps states there."""
    meta = runtime.metadata
    on_cuda = runtime.provider == "CUDAExecutionProvider"
    if settings.state_pool == "host" or (settings.state_pool == "auto" and not on_cuda):
        return StatePool(meta.num_states, meta.num_layers, meta.hidden_size, settings.max_sessions)
    layout = StateLayout(
        tuple(meta.state_inputs), tuple(meta.state_outputs), meta.num_layers, meta.hidden_size
    )
    return DevicePool(
        runtime.onnx_path,
        layout,
        max_slots=settings.max_sessions,
        device="cuda" if on_cuda else "cpu",
        intra_op_threads=settings.intra_op_threads,
    )


def _serve(
    runtime: ModelRuntime, pool: SlotPool, settings: Settings, executor: Executor
) -> ServedModel:
    meta = runtime.metadata
    batcher = Batcher(
        runtime,
        pool,
        executor,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_s,
        max_queue_depth=settings.max_queue_depth,
    )
    return ServedModel(metadata=meta, batcher=batcher)
