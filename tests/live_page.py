"""Helpers for the live page's browser tests: Debian's chromium driven by Playwright, a page
object that reads what the page shows, and a proxy that breaks websocket connections.

``chromium`` (Debian package ``chromium``, installed by ``make system-packages``) must be
installed: the tests fail, not skip, without it. Playwright never downloads a browser here; it
launches the system one.
"""

from __future__ import annotations

import shutil
import socket
import socketserver
import struct
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

    def play(self, *, rate: float, limit: int | None = None) -> None:
        """Stream the chosen series and wait until every row is answered."""
        self.start(rate=rate, limit=limit)
        self.wait_for_state("finished")

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


class CuttingProxy(socketserver.ThreadingTCPServer):
    """A loopback TCP proxy in front of the service that can break its websocket connections.

    The page is loaded through it, so its HTTP requests and its websocket go through it too.
    ``hold("replies")`` stops passing the service's bytes to the page on websocket connections
    (``hold("requests")``: the page's bytes to the service); ``cut()`` then aborts those
    connections, as a network failure would: the page sees close code 1006 and has to resume.
    Held bytes are lost with the connection, so a held reply is a step applied whose answer
    never arrived, and a held request a step the service never saw.
    """

    daemon_threads = True  # one thread per connection, plus one per connection's replies

    def __init__(self, upstream_port: int) -> None:
        super().__init__((HOST, 0), _Forward)
        self.upstream_port = upstream_port
        self.held: set[str] = set()
        self.connections: list[tuple[socket.socket, socket.socket, bool]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"

    def hold(self, direction: str) -> None:
        assert direction in ("requests", "replies")
        with self.lock:
            self.held.add(direction)

    def cut(self) -> None:
        self._abort(streams_only=True)

    def close(self) -> None:
        self.shutdown()
        self._abort(streams_only=False)
        self.server_close()
        self.thread.join(10)

    def _abort(self, *, streams_only: bool) -> None:
        with self.lock:
            for page_side, service_side, stream in self.connections:
                if stream or not streams_only:
                    _abort(page_side)
                    _abort(service_side)
            self.held.clear()

    def pump(self, src: socket.socket, dst: socket.socket, direction: str, stream: bool) -> None:
        """Pass bytes from ``src`` to ``dst`` until either side ends, then end both."""
        try:
            while data := src.recv(65536):
                with self.lock:
                    passed = not (stream and direction in self.held)  # held: lost in the cut
                if passed:
                    dst.sendall(data)
        except OSError:
            pass
        _abort(src)
        _abort(dst)


class _Forward(socketserver.BaseRequestHandler):
    """One connection through the proxy: requests in this thread, replies in another."""

    server: CuttingProxy

    def handle(self) -> None:
        page_side: socket.socket = self.request
        service_side = socket.create_connection((HOST, self.server.upstream_port))
        head = page_side.recv(65536)
        stream = head.startswith(b"GET /v1/stream")  # a websocket's upgrade request
        entry = (page_side, service_side, stream)
        with self.server.lock:
            self.server.connections.append(entry)
        service_side.sendall(head)
        replies = threading.Thread(
            target=self.server.pump, args=(service_side, page_side, "replies", stream)
        )
        replies.start()
        self.server.pump(page_side, service_side, "requests", stream)
        replies.join()
        with self.server.lock:
            self.server.connections.remove(entry)
        service_side.close()


def _abort(sock: socket.socket) -> None:
    """End a connection at once with a reset, waking any thread blocked on it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
