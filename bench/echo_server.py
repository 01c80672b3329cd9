"""A bare echo server on the service's own stack (FastAPI + uvicorn, one worker): the ceiling.

It speaks the same protocol as the service with no model behind it: ``/v1/stream`` announces a
session and answers every frame ``{"inputs": rows}`` with ``{"outputs": rows, "step_count": n}``;
``POST /v1/sessions`` and ``POST /v1/sessions/{id}/steps`` do the same over HTTP. The frames are
parsed and serialised like the service does, so the difference to the service is the model work.
With ``--grpc-port`` it also serves Triton's ``ModelStreamInfer`` through the service's own stream
and codec (``service.grpc``), answering each request's ``x`` as ``y``.

    python bench/echo_server.py --host 127.0.0.1 --port 8100 [--grpc-port 8101]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import orjson
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response

from service.grpc import codec
from service.grpc.proto import grpc_service_pb2 as pb
from service.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from service.grpc.stream import InferStream
from service.v2.infer import InferResult


def echo_reply(body: bytes | str, step_count: int) -> tuple[bytes, int]:
    """The reply to one frame and the new step count; rows echo back as outputs."""
    return echo_frame(orjson.loads(body), step_count)


def echo_frame(frame: dict[str, Any], step_count: int) -> tuple[bytes, int]:
    inputs: Any = frame["inputs"]
    rows = inputs if inputs and isinstance(inputs[0], list) else [inputs]
    step_count += len(rows)
    return orjson.dumps({"outputs": rows, "step_count": step_count}), step_count


def _json(content: dict[str, Any], status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


class EchoStreams(pb_grpc.GRPCInferenceServiceServicer):
    """``ModelStreamInfer`` answering ``y = x``, with the service's stream, codec and parameters."""

    def __init__(self) -> None:
        self.step_counts: dict[Any, int] = {}

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> None:
        stream = InferStream(self.answer, context)
        reader = asyncio.ensure_future(stream.read(requests))
        try:
            await stream.write()
        finally:
            reader.cancel()

    async def answer(self, request: Any) -> Any:
        decoded = codec.decode_request(request)
        x = decoded.inputs[0].data  # (1, T, n)
        sequence_id = decoded.parameters.get("sequence_id", 0)
        start = bool(decoded.parameters.get("sequence_start"))
        end = bool(decoded.parameters.get("sequence_end"))
        count = (0 if start else self.step_counts.get(sequence_id, 0)) + x.shape[1]
        self.step_counts[sequence_id] = count
        if end:
            del self.step_counts[sequence_id]
        parameters = {
            "sequence_id": sequence_id,
            "sequence_start": start,
            "sequence_end": end,
            "session_id": f"echo-{sequence_id}",
            "step_count": count,
        }
        result = InferResult(SimpleNamespace(version=1), parameters, [("y", x)])  # type: ignore[arg-type]
        answer = pb.ModelStreamInferResponse()
        codec.fill_response(answer.infer_response, request, result)
        return answer


def create_app(grpc_port: int = 0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server = grpc.aio.server() if grpc_port else None
        if server is not None:
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoStreams(), server)  # type: ignore[no-untyped-call]
            server.add_insecure_port(f"127.0.0.1:{grpc_port}")
            await server.start()
        yield
        if server is not None:
            await server.stop(1)

    app = FastAPI(title="rnnserve echo (benchmark ceiling)", lifespan=lifespan)
    ids = itertools.count(1)
    step_counts: dict[str, int] = {}

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request) -> Response:
        body = orjson.loads(await request.body())
        session_id = f"echo-{next(ids)}"
        step_counts[session_id] = 0
        hello = {"session_id": session_id, "model": body.get("model"), "version": 1}
        return _json(hello | {"step_count": 0}, status_code=201)

    @app.post("/v1/sessions/{session_id}/steps")
    async def step(session_id: str, request: Request) -> Response:
        reply, step_counts[session_id] = echo_reply(await request.body(), step_counts[session_id])
        return Response(reply, media_type="application/json")

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str) -> None:
        step_counts.pop(session_id, None)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket, model: str = "echo") -> None:
        await websocket.accept()
        session_id = f"echo-{next(ids)}"
        hello = {"session_id": session_id, "model": model, "version": 1, "step_count": 0}
        await websocket.send_bytes(orjson.dumps(hello))
        step_count = 0
        while True:  # the service's own loop: receive any frame, reply with a binary frame
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = orjson.loads(message.get("text") or message.get("bytes") or b"")
            if frame.get("close") is True:  # as the service: close the session and the socket
                await websocket.close(1000, "session closed")
                return
            reply, step_count = echo_frame(frame, step_count)
            await websocket.send_bytes(reply)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--grpc-port", type=int, default=0, help="also serve gRPC (0: off)")
    args = parser.parse_args()
    app = create_app(args.grpc_port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
