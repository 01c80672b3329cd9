"""uvicorn's websocket protocol, bounded in memory and with a fast path for small data frames.

**Bounded.** Every ping a client sends queues a pong on the server's write buffer; a client that
sends pings (or frames) and never reads the answers would grow that buffer without bound, even
after the server closed the connection (the red team grew a server by 194 MB this way). This
protocol stops reading from the socket while the transport's buffer is above its high-water
mark, so TCP flow control holds the client back and the server's memory stays bounded.

**Fast.** A streaming client sends one small frame per step and reads one small reply. For the
common case, one whole unfragmented text or binary frame in one read, with no extension, this
protocol reads the frame itself, and writes data replies itself, instead of going through the
general websocket state machine (which stays in charge of everything else: the handshake,
control frames, fragmentation, errors and closing). It takes the fast path only where that
state machine is idle between frames, so the two never disagree about the stream.
"""

from __future__ import annotations

from typing import Any

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.utils import apply_mask

FIN_TEXT, FIN_BINARY = 0x81, 0x82  # FIN set, no RSV bits, opcode 1 or 2
MASKED = 0x80


class ServiceWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writing_paused = False

    # -- bounded ---------------------------------------------------------------------------------

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

    # -- fast ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._fast_frame(data):
            super().data_received(data)

    def _fast_frame(self, data: bytes) -> bool:
        """Deliver ``data`` if it is exactly one small whole data frame the state machine would
        simply pass on; False (nothing done) otherwise."""
        conn = self.conn
        if (
            len(data) < 6
            or data[0] not in (FIN_TEXT, FIN_BINARY)
            or not data[1] & MASKED
            or conn.state is not State.OPEN
            or conn.reader.buffer
            or conn.current_size is not None
            or conn.extensions
        ):
            return False
        length, start = data[1] & 0x7F, 6
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 8
        elif length == 127:
            return False  # 64 KiB and more: the general path
        max_size = conn.max_message_size
        if len(data) != start + length or (max_size is not None and length > max_size):
            return False
        payload = apply_mask(data[start:], data[start - 4 : start])
        if data[0] == FIN_TEXT:
            try:
                payload.decode()  # invalid UTF-8 takes the general path, which closes with 1007
            except UnicodeDecodeError:
                return False
            self.curr_msg_data_type = "text"
        else:
            self.curr_msg_data_type = "bytes"
        self.frames = [payload]
        self.send_receive_event_to_app()
        return True

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] != "websocket.send" or not self._open_for_data():
            await super().send(message)
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        text = message.get("text")
        if text is not None:
            self.transport.write(_frame(FIN_TEXT, text.encode()))
        else:
            self.transport.write(_frame(FIN_BINARY, message.get("bytes") or b""))

    def _open_for_data(self) -> bool:
        return (
            self.handshake_complete
            and self.initial_response is None
            and not self.close_sent
            and self.conn.state is State.OPEN
            and not self.conn.expect_continuation_frame
            and not self.conn.extensions
        )


def _frame(first: int, payload: bytes) -> bytes:
    """A whole unmasked frame (servers do not mask) with ``payload``."""
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 1 << 16:
        return bytes((first, 126)) + length.to_bytes(2, "big") + payload
    return bytes((first, 127)) + length.to_bytes(8, "big") + payload
