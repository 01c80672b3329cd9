"""Reject request bodies over the size limit, or too slow to arrive, before they are parsed."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.asgi import header
from service.api.responses import error_response
from service.engine.errors import BodyTooLarge, RequestTimeout


class BodySizeLimit:
    """413 for a declared Content-Length over the limit, or once streamed bytes pass it; 408 (and
    the connection closed) when the body has not fully arrived ``timeout_s`` after the first read.

    The per-step endpoints apply the same limits themselves (``service.api.asgi.read_body``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, BodyTooLarge(self.max_bytes).message)(scope, receive, send)
            return
        await self.app(scope, self._limited(receive), send)

    def _limited(self, receive: Receive) -> Receive:
        received, deadline = 0, None

        async def limited_receive() -> Message:
            nonlocal received, deadline
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timeout = RequestTimeout(self.timeout_s)
                raise HTTPException(408, detail=timeout.message, headers=timeout.headers) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body parsing; our handler renders it.
                    raise HTTPException(413, detail=BodyTooLarge(self.max_bytes).message)
            return message

        return limited_receive
