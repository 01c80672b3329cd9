"""uvicorn's websocket protocol, made to stop reading while its write buffer is full.

Every ping a client sends queues a pong on the server's write buffer; a client that sends pings
(or frames) and never reads the answers would grow that buffer without bound, even after the
server closed the connection (the red team grew a server by 194 MB this way). This protocol
pauses reading from the socket while the transport's buffer is above its high-water mark, so TCP
flow control holds the client back and the server's memory stays bounded. Everything else is
uvicorn's ``websockets-sansio`` implementation.
"""

from __future__ import annotations

from typing import Any

from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing_paused = False

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writing_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writing_paused = False
        if not self.read_paused:  # the application's own pause (one message at a time) stands
            self.transport.resume_reading()

    async def receive(self) -> ASGIReceiveEvent:
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self.writing_paused:
                self.transport.resume_reading()
        return message
