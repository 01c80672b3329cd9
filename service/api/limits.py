"""Reject request bodies over the size limit before they are parsed."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.responses import error_response
from service.engine.errors import BodyTooLarge


class BodySizeLimit:
    """413 for a declared Content-Length over the limit, or once streamed bytes pass it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope["headers"])
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, BodyTooLarge(self.max_bytes).message)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body parsing; our handler renders it.
                    raise HTTPException(413, detail=BodyTooLarge(self.max_bytes).message)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The (last) Content-Length header's value, if any; ASGI header names are lower-case."""
    found = None
    for name, value in headers:
        if name == b"content-length":
            found = value
    return found
