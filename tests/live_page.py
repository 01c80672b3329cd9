"""Helpers for the live page's browser tests: Debian's chromium driven by Playwright, a page
object that reads what the page shows, and a proxy that breaks websocket connections.

``chromium`` (Debian package ``chromium``, installed by ``make system-packages``) must be
installed: the tests fail, not skip, without it. Playwright never downloads a browser here; it
launches the system one.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from typing import Any

import httpx
from loopback import HOST
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright

# Known to work as root on a closed network: without the background-networking flags Chromium
# keeps trying to reach Google's servers.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000  # for anything the page should do within a few seconds on a busy machine


def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's chromium, headless (Playwright gives it a new empty profile)."""
    executable = shutil.which("chromium")
    assert executable, (
        "chromium is not installed; the live page's tests need a real browser "
        "(Debian: apt-get install -y chromium, or make system-packages)"
    )
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)


class LivePage:
    """The page at ``/ui/`` of a service, with what it logs and shows made easy to read."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.console_errors: list[str] = []
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.console_errors.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def open(self) -> LivePage:
        self.page.goto(f"{self.base_url}/ui/")
        return self

    def wait_for_models(self) -> None:
        self.page.wait_for_selector("#model-rows tr[data-name]")

    def models_table(self) -> list[list[str]]:
        return self.page.eval_on_selector_all(
            "#model-rows tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )

    def start(self, *, rate: float, limit: int | None = None) -> None:
        """Stream the chosen series at ``rate`` steps per second, at most ``limit`` steps."""
        self.page.fill("#rate", str(rate))
        self.page.fill("#limit", "" if limit is None else str(limit))
        self.page.click("#start")

    def wait_for_state(self, state: str, timeout_ms: int = TIMEOUT_MS) -> None:
        self.page.wait_for_function(
            "state => document.getElementById('stream').dataset.state === state",
            arg=state,
            timeout=timeout_ms,
        )

    def wait_for_steps(self, count: int) -> None:
        """Wait until the page shows at least ``count`` steps."""
        self.page.wait_for_function(
            "n => Number(document.getElementById('step-count').textContent) >= n", arg=count
        )

    def step_count(self) -> int:
        return int(self.page.text_content("#step-count") or "0")

    def session_id(self) -> str:
        return self.page.text_content("#session-id") or ""

    def steps(self) -> list[dict[str, Any]]:
        """Every row of the steps table, at full precision: step, inputs, outputs (None: lost)."""
        return self.page.eval_on_selector_all(
            "#steps tr",
            """rows => rows.map(r => ({
                step: Number(r.dataset.step),
                inputs: JSON.parse(r.dataset.inputs),
                outputs: r.dataset.outputs ? JSON.parse(r.dataset.outputs) : null,
            }))""",
        )

    def errors(self) -> list[str]:
        """The messages in the error list, oldest first."""
        return self.page.eval_on_selector_all(
            "#error-list li", "items => items.map(i => i.dataset.message)"
        )

    def wait_for_error(self, text: str) -> None:
        self.page.wait_for_function(
            """text => [...document.querySelectorAll('#error-list li')]
                .some(i => i.dataset.message.includes(text))""",
            arg=text,
        )

    def notices(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "#notices li", "items => items.map(i => i.textContent)"
        )

    def drawn(self, series: str) -> int:
        """How many points of a stream chart series (input, actual, prediction) are drawn."""
        key = "drawn" + series.capitalize()
        return int(self.page.eval_on_selector("#stream-chart", f"c => c.dataset.{key}") or 0)


def session_outputs(base_url: str, model: str, inputs: list[list[float]]) -> list[list[float]]:
    """What ``POST /v1/sessions/{id}/steps`` answers for ``inputs`` in a new ``model`` session."""
    with httpx.Client(base_url=base_url) as client:
        created = client.post("/v1/sessions", json={"model": model})
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        reply = client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": inputs})
        assert reply.status_code == 200, reply.text
        client.delete(f"/v1/sessions/{session_id}")
    outputs: list[list[float]] = reply.json()["outputs"]
    return outputs


class CuttingProxy:
    """A loopback TCP proxy in front of the service that can break its websocket connections.

    The page is loaded through it, so its HTTP requests and its websocket go through it too.
    ``hold("replies")`` stops passing the service's bytes to the page on websocket connections
    (``hold("requests")``: the page's bytes to the service); ``cut()`` then aborts those
    connections, as a network failure would: the page sees close code 1006 and has to resume.
    Held bytes are lost with the connection, so a held reply is a step applied whose answer
    never arrived, and a held request a step the service never saw.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.held: set[str] = set()
        self.connections: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, bool]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10), "the proxy did not start"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def hold(self, direction: str) -> None:
        assert direction in ("requests", "replies")
        self._call(self._hold(direction))

    def cut(self) -> None:
        self._call(self._abort(streams_only=True))

    def close(self) -> None:
        self._call(self._abort(streams_only=False))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _call(self, coroutine: Any) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _hold(self, direction: str) -> None:
        self.held.add(direction)

    async def _abort(self, *, streams_only: bool) -> None:
        for page_side, service_side, stream in list(self.connections):
            if stream or not streams_only:
                page_side.transport.abort()
                service_side.transport.abort()
        self.held.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        head = await reader.read(65536)
        stream = head.startswith(b"GET /v1/stream")  # a websocket's upgrade request
        entry = (writer, up_writer, stream)
        self.connections.append(entry)
        up_writer.write(head)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, "requests", stream)),
            asyncio.create_task(self._pump(up_reader, writer, "replies", stream)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        writer.transport.abort()
        up_writer.transport.abort()
        self.connections.remove(entry)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str, stream: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if stream and direction in self.held:
                    continue  # lost with the connection when it is cut
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            return
