"""One ``ModelStreamInfer`` call: many requests, of many sequences, answered on one stream.

- Every request gets exactly one ``ModelStreamInferResponse``: its result, or its error in
  ``error_message`` (the stream stays open). Each response echoes the request's ``id``.
- Requests of one sequence (same model and ``sequence_id``) run one at a time and are answered in
  the order they arrived; requests of different sequences, and stateless requests, run
  concurrently and are answered as they finish.
- At most ``MAX_IN_FLIGHT`` requests of one stream are read and not yet answered; past that the
  stream is not read until one is answered, and HTTP/2 flow control holds the client back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.grpc.proto import grpc_service_pb2 as pb

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256  # requests of one stream read and not yet answered

Answer = Callable[[pb.ModelInferRequest], Awaitable[pb.ModelStreamInferResponse]]
SequenceKey = tuple[str, int | str]


def sequence_key(request: pb.ModelInferRequest) -> SequenceKey | None:
    """(model, sequence id) of a sequence request; None for a stateless one."""
    parameter = request.parameters.get("sequence_id")
    if parameter is None:
        return None
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param", "string_param"):
        return None  # not a valid id: the request fails on its own, in no sequence's line
    value: int | str = getattr(parameter, choice)
    return None if value in (0, "") else (request.model_name, value)


class InferStream:
    """Reads a stream's requests, runs each through ``answer`` and writes the responses.

    ``read`` runs in a task of its own; ``write``, in the RPC's handler, sends answers as they
    come until reading has ended and everything read is answered. Answers wait in an outbox: a
    finished write takes the next one at once (gRPC allows one message in flight per call).
    """

    def __init__(self, answer: Answer, context: Any) -> None:
        self._answer = answer
        self._context = context  # grpc.aio.ServicerContext
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)  # taken on read, given back once written
        self._tails: dict[SequenceKey, asyncio.Task[None]] = {}  # each sequence's latest request
        self._pending: set[asyncio.Task[None]] = set()
        self._outbox: deque[pb.ModelStreamInferResponse] = deque()
        self._ready = asyncio.Event()  # an answer is in the outbox, or a request or reading ended
        self._reading = True
        self._open = True  # False once a write failed: the call is over, answers are dropped

    async def read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        """Read until the client half-closes; each request runs in a task of its own.

        A slot is taken before reading, so a cancelled read (at shutdown) loses no request that
        was already read.
        """
        try:
            while True:
                await self._slots.acquire()
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    return
                self._start(request)
        finally:
            self._reading = False
            self._ready.set()

    async def write(self) -> None:
        """Send answers until reading has ended and every request read is answered."""
        while True:
            while self._outbox:
                await self._send(self._outbox.popleft())
                self._slots.release()
            if not (self._reading or self._pending):
                return
            self._ready.clear()
            await self._ready.wait()

    async def drain(self) -> None:
        """Wait until every request read so far has its answer (for a call that is over)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    def _start(self, request: pb.ModelInferRequest) -> None:
        key = sequence_key(request)
        previous = None if key is None else self._tails.get(key)
        task = asyncio.get_running_loop().create_task(self._run(request, key, previous))
        self._pending.add(task)
        task.add_done_callback(self._finished)
        if key is not None:
            self._tails[key] = task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._ready.set()

    async def _run(
        self,
        request: pb.ModelInferRequest,
        key: SequenceKey | None,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Answer one request, after the previous request of its sequence has its answer."""
        try:
            if previous is not None and not previous.done():
                await asyncio.wait((previous,))  # never cancels ``previous``, unlike ``await``
            self._outbox.append(await self._answer(request))
            self._ready.set()
        finally:
            if key is not None and self._tails.get(key) is asyncio.current_task():
                del self._tails[key]

    async def _send(self, response: pb.ModelStreamInferResponse) -> None:
        if not self._open:
            return
        try:
            await self._context.write(response)
        except Exception as exc:  # the call ended under us: the client left or cancelled
            logger.debug("stream closed, dropping the remaining answers: %r", exc)
            self._open = False
