"""A TCP proxy that holds chosen traffic back: fault injection between the service and Redis.

``hold_replies_to(marker, seconds)`` delays the reply to the next request that contains
``marker`` (the write is applied, its reply is late); ``swallow_requests_with(marker)`` keeps
the next request that contains ``marker`` from ever reaching the server (it is not applied);
``pause_after(marker, seconds)`` forwards the next request that contains ``marker`` and then
delays all traffic (that request's reply included) for ``seconds``.
"""

from __future__ import annotations

import asyncio
import threading

from loopback import HOST


class FaultProxy:
    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._hold_marker: bytes | None = None
        self._hold_s = 0.0
        self._swallow_marker: bytes | None = None
        self._pause_marker: bytes | None = None
        self._pause_s = 0.0
        self._paused_until = 0.0
        self.held = self.swallowed = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def hold_replies_to(self, marker: bytes, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self._arm_hold, marker, seconds)

    def swallow_requests_with(self, marker: bytes) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "_swallow_marker", marker)

    def pause_after(self, marker: bytes, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self._arm_pause, marker, seconds)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _shutdown(self) -> None:
        """Cancel every connection's tasks, so none is left pending when the loop stops."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _arm_hold(self, marker: bytes, seconds: float) -> None:
        self._hold_marker, self._hold_s = marker, seconds

    def _arm_pause(self, marker: bytes, seconds: float) -> None:
        self._pause_marker, self._pause_s = marker, seconds

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream)
        delays: asyncio.Queue[float] = asyncio.Queue()  # one entry per request sent upstream
        pumps = [
            asyncio.create_task(self._requests(reader, up_writer, delays)),
            asyncio.create_task(self._replies(up_reader, writer, delays)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.transport.abort()
        up_writer.transport.abort()

    async def _requests(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delays: asyncio.Queue[float]
    ) -> None:
        while data := await src.read(1 << 16):
            await self._wait_pause()
            if self._swallow_marker is not None and self._swallow_marker in data:
                self._swallow_marker = None
                self.swallowed += 1
                continue  # never reaches the server
            delay = 0.0
            if self._hold_marker is not None and self._hold_marker in data:
                self._hold_marker, delay = None, self._hold_s
                self.held += 1
            delays.put_nowait(delay)
            dst.write(data)
            await dst.drain()
            if self._pause_marker is not None and self._pause_marker in data:
                self._pause_marker = None
                self._paused_until = self.loop.time() + self._pause_s

    async def _replies(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delays: asyncio.Queue[float]
    ) -> None:
        while data := await src.read(1 << 16):
            delay = delays.get_nowait() if not delays.empty() else 0.0
            await self._wait_pause()
            if delay:
                await asyncio.sleep(delay)
            dst.write(data)
            await dst.drain()

    async def _wait_pause(self) -> None:
        remaining = self._paused_until - self.loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)
