"""A TCP proxy for websocket traffic that cuts a connection at a chosen frame (tests only)."""

from __future__ import annotations

import asyncio
import threading

from loopback import HOST


class FrameCutter:
    """A TCP proxy for websocket traffic that cuts its first connection at a chosen data frame.

    ``client_frame=k`` drops the client's k-th data frame (0-based) instead of forwarding it, so
    the server never applies it; ``server_frame=k`` forwards everything up to the server's k-th
    data frame (0 is the announcement, k is the reply to client frame k-1) and drops that one, so
    the step is applied but its reply is lost. Either way both sockets are then closed.
    """

    def __init__(
        self, upstream: int, *, client_frame: int | None = None, server_frame: int | None = None
    ) -> None:
        self.upstream = upstream
        self.cut_at = {"client": client_frame, "server": server_frame}
        self.connections = 0
        self.cuts = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = self.connections == 0
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream)
        cuts = self.cut_at if first else {"client": None, "server": None}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, cuts["client"])),
            asyncio.create_task(self._pump(up_reader, writer, cuts["server"])),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        writer.transport.abort()
        up_writer.transport.abort()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, cut_at: int | None
    ) -> None:
        try:
            dst.write(await src.readuntil(b"\r\n\r\n"))  # the HTTP upgrade request or response
            frames = 0
            while True:
                opcode, raw = await _read_frame(src)
                if opcode in (1, 2):  # text or binary data frame
                    if frames == cut_at:
                        self.cuts += 1
                        return
                    frames += 1
                dst.write(raw)
                await dst.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


async def _read_frame(src: asyncio.StreamReader) -> tuple[int, bytes]:
    """One websocket frame (RFC 6455 section 5.2) as (opcode, raw bytes)."""
    head = await src.readexactly(2)
    length, extra = head[1] & 0x7F, b""
    if length == 126:
        extra = await src.readexactly(2)
        length = int.from_bytes(extra, "big")
    elif length == 127:
        extra = await src.readexactly(8)
        length = int.from_bytes(extra, "big")
    mask = await src.readexactly(4) if head[1] & 0x80 else b""
    return head[0] & 0x0F, head + extra + mask + await src.readexactly(length)
