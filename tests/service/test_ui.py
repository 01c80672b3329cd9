"""The live page at ``/ui``, in a real browser against a real service on loopback.

Debian's chromium, driven by Playwright (``tests/live_page.py``), loads the page from a uvicorn
server serving the shipped default model; everything the page shows is checked against what
the API answers for the same inputs. The screenshot test writes ``live-page.png`` under its
tmp_path, and also into the folder named by ``RNNSERVE_DOCS_ASSETS`` (``make screenshot``).
"""

from __future__ import annotations

import os
import shutil
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from live_page import CuttingProxy, LivePage, launch_chromium, session_outputs
from playwright.sync_api import Browser, sync_playwright

from service.ui.files import STATIC_DIR

if TYPE_CHECKING:
    from conftest import LiveServer, TestClient

ROOT = Path(__file__).resolve().parents[2]
MODEL = "co2-forecaster"
EXAMPLE = ROOT / "examples" / "co2_changes.csv"
TOLERANCE = 1e-5
PHONE = {"width": 390, "height": 844}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default model alone (instead of conftest's tiny models): the example
    series is its kind of data."""
    root = tmp_path_factory.mktemp("ui-models")
    shutil.copytree(ROOT / "models" / MODEL / "1", root / MODEL / "1")
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., LivePage]]:
    """``open_page(base_url, **context_options)``: the page in a fresh browser context."""
    contexts = []

    def open_(base_url: str, **options: Any) -> LivePage:
        context = browser.new_context(**options)
        contexts.append(context)
        return LivePage(context.new_page(), base_url).open()

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def live(server: LiveServer, open_page: Callable[..., LivePage]) -> LivePage:
    """The page on a fresh service, its models listed."""
    page = open_page(server.http_url)
    page.wait_for_models()
    return page


@pytest.fixture
def proxy(server: LiveServer) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(server.port)
    yield cutting
    cutting.close()


def example_changes() -> list[float]:
    lines = EXAMPLE.read_text().split()
    assert lines[0] == "week,co2_change"
    return [float(line.split(",")[1]) for line in lines[1:]]


def server_step_count(base_url: str, session_id: str) -> int:
    reply = httpx.get(f"{base_url}/v1/sessions/{session_id}")
    assert reply.status_code == 200, reply.text
    return int(reply.json()["step_count"])


def assert_close(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got == pytest.approx(want, abs=TOLERANCE), f"step {step}"


# ----------------------------------------------------------------------------- the files


def test_page_is_served_without_a_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=["right-key"])
    redirect = client.get("/ui", follow_redirects=False)
    assert redirect.status_code in (307, 308)
    assert redirect.headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    script = client.get("/ui/js/main.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert client.get("/v1/models").status_code == 401  # the API itself still needs the key


def test_the_example_series_is_the_repositorys(client: TestClient) -> None:
    served = client.get("/ui/co2_changes.csv")
    assert served.status_code == 200
    assert served.content == EXAMPLE.read_bytes()


def test_the_package_data_ships_every_static_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service.ui"]
    package = STATIC_DIR.parent
    shipped = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    assert shipped == {path for path in STATIC_DIR.rglob("*") if path.is_file()}


# ----------------------------------------------------------------------------- in the browser


def test_page_loads_without_console_errors_and_lists_the_models(
    server: LiveServer, live: LivePage
) -> None:
    models = httpx.get(f"{server.http_url}/v1/models").json()["models"]
    expected = [
        [
            m["name"],
            f"{m['version']} (default)",
            m["cell"],
            f"{m['num_layers']} × {m['hidden_size']}",
            f"{m['input_size']} ({', '.join(m['feature_names'])}) → "
            f"{m['output_size']} ({', '.join(m['output_names'])})",
            m["provider"],
            "loaded",
        ]
        for m in models
    ]
    assert [row[:7] for row in live.models_table()] == expected
    # Two answers from /v1/stats draw the first point of the rates.
    live.page.wait_for_function(
        "() => document.querySelector('[data-metric=steps] canvas').dataset.drawnSteps >= 1"
    )
    assert live.page.text_content("#readiness") == "ready"
    assert live.console_errors == []


def test_streaming_50_steps_draws_the_sessions_predictions(
    server: LiveServer, live: LivePage
) -> None:
    live.play(rate=200, limit=50)
    steps = live.steps()
    changes = example_changes()
    assert [s["step"] for s in steps] == list(range(50))
    assert [s["inputs"] for s in steps] == [[v] for v in changes[:50]]
    expected = session_outputs(server.http_url, MODEL, [[v] for v in changes[:50]])
    assert_close([s["outputs"] for s in steps], expected)
    assert live.drawn("prediction") == 50
    assert live.drawn("input") == 50
    assert live.step_count() == 50
    assert server_step_count(server.http_url, live.session_id()) == 50
    # The running error compares each prediction with the next row's value.
    errors = [abs(out[0] - actual) for out, actual in zip(expected, changes[1:51], strict=True)]
    shown = live.page.eval_on_selector("#running-error", "e => [e.dataset.count, e.dataset.mae]")
    assert int(shown[0]) == 50
    assert float(shown[1]) == pytest.approx(sum(errors) / 50, abs=TOLERANCE)
    assert live.console_errors == []


def test_reset_and_close_map_to_the_session(server: LiveServer, live: LivePage) -> None:
    live.start(rate=50)
    live.wait_for_steps(5)
    live.page.click("#pause")
    live.wait_for_state("paused")
    session_id = live.session_id()
    first = live.steps()
    assert server_step_count(server.http_url, session_id) == live.step_count() == len(first)

    live.page.click("#reset")
    live.page.wait_for_function("() => document.getElementById('step-count').textContent === '0'")
    assert server_step_count(server.http_url, session_id) == 0
    assert live.steps() == []
    live.page.click("#resume")
    live.wait_for_steps(3)
    live.page.click("#pause")
    live.wait_for_state("paused")
    again = live.steps()
    # A zeroed state predicts the series' first steps as the first time.
    assert_close([s["outputs"] for s in again[:3]], [s["outputs"] for s in first[:3]])

    live.page.click("#close")
    live.wait_for_state("closed")
    gone = httpx.get(f"{server.http_url}/v1/sessions/{session_id}")
    assert gone.status_code == 404
    assert live.page.is_enabled("#start")
    assert live.console_errors == []


@pytest.mark.parametrize(
    ("held", "lost"),
    [
        pytest.param("requests", False, id="step-never-arrived"),
        pytest.param("replies", True, id="reply-lost"),
    ],
)
def test_dropped_connection_resumes_the_session_exactly(
    server: LiveServer,
    proxy: CuttingProxy,
    open_page: Callable[..., LivePage],
    held: str,
    lost: bool,
) -> None:
    live = open_page(proxy.url)  # everything the page loads and opens goes through the proxy
    live.wait_for_models()
    live.start(rate=20, limit=40)
    live.wait_for_steps(10)
    session_id = live.session_id()
    proxy.hold(held)
    # Held replies: the service applies the next step, but its reply never reaches the page.
    # Held requests: the page sends the next step, and the service never sees it.
    dropped_at, _ = _settled(
        live,
        lambda: (live.step_count(), server_step_count(server.http_url, session_id)),
        ahead=int(lost),
    )
    proxy.cut()
    live.wait_for_state("finished")

    assert server_step_count(server.http_url, session_id) == 40
    steps = live.steps()
    assert [s["step"] for s in steps] == list(range(40))
    assert [s["step"] for s in steps if s["outputs"] is None] == ([dropped_at] if lost else [])
    changes = example_changes()
    expected = session_outputs(server.http_url, MODEL, [[v] for v in changes[:40]])
    for step in steps:
        if step["outputs"] is not None:
            assert step["outputs"] == pytest.approx(expected[step["step"]], abs=TOLERANCE)
    notices = " | ".join(live.notices())
    assert f"resumed session {session_id} at step {dropped_at + int(lost)}" in notices
    assert ("its reply was lost" in notices) == lost


def _settled(live: LivePage, read: Callable[[], tuple[int, int]], ahead: int) -> tuple[int, int]:
    """(page steps, service steps) from ``read()`` once they stop changing (the same twice,
    0.3 s apart) with the service ``ahead`` steps ahead of the page."""
    before = None
    for _ in range(100):
        now = read()
        if now == before and now[1] - now[0] == ahead:
            return now
        before = now
        live.page.wait_for_timeout(300)
    raise AssertionError(f"the page and the service did not settle: {before}")


def test_uploaded_csv_streams_the_picked_column(
    server: LiveServer, live: LivePage, tmp_path: Path
) -> None:
    values = [0.1 * ((i * 7) % 11) - 0.5 for i in range(20)]
    csv = tmp_path / "series.csv"
    rows = [f"{i},{2 * v},{v}" for i, v in enumerate(values)]
    csv.write_text("t,double,value\n" + "\n".join(rows) + "\n")
    live.page.set_input_files("#csv-file", str(csv))
    live.page.select_option("#column-pickers select[data-input='0']", "value")
    live.page.select_option("#target-column", "double")
    live.play(rate=200)
    steps = live.steps()
    assert [s["inputs"] for s in steps] == [[v] for v in values]
    expected = session_outputs(server.http_url, MODEL, [[v] for v in values])
    assert_close([s["outputs"] for s in steps], expected)
    assert live.drawn("actual") == 19  # the last row has no next value
    assert live.console_errors == []


def test_a_rejected_step_shows_the_services_error_and_pauses(
    server: LiveServer, live: LivePage, tmp_path: Path
) -> None:
    csv = tmp_path / "huge.csv"
    csv.write_text("x\n0.5\n0.25\n1e39\n0.1\n")  # 1e39 is beyond float32
    live.page.set_input_files("#csv-file", str(csv))
    live.start(rate=100)
    live.wait_for_state("paused")
    live.wait_for_error("The service rejected step 2: ")
    assert live.step_count() == 2
    assert server_step_count(server.http_url, live.session_id()) == 2


def test_a_synthetic_signal_streams(server: LiveServer, live: LivePage) -> None:
    live.page.check("input[name=source][value=synthetic]")
    live.page.select_option("#synthetic-kind", "square")
    live.page.fill("#synthetic-length", "30")
    live.play(rate=200)
    steps = live.steps()
    assert len(steps) == 30
    expected = session_outputs(server.http_url, MODEL, [s["inputs"] for s in steps])
    assert_close([s["outputs"] for s in steps], expected)


def test_a_wrong_key_shows_the_error_and_the_right_one_streams(
    make_server: Callable[..., LiveServer], open_page: Callable[..., LivePage]
) -> None:
    server = make_server(api_keys=["right-key"])
    live = open_page(server.http_url)
    live.wait_for_error("API key missing or refused: unauthorized: this service needs an API key")
    assert live.page.is_visible("#key-panel")

    live.page.fill("#api-key", "wrong-key")
    live.page.click("#key-panel button[type=submit]")
    live.wait_for_error("API key missing or refused: unauthorized: the API key is not valid")
    assert live.page.is_visible("#key-panel")

    live.page.fill("#api-key", "right-key")
    live.page.click("#key-panel button[type=submit]")
    live.wait_for_models()
    storage = live.page.evaluate("() => [sessionStorage.length, localStorage.length]")
    assert storage == [1, 0]  # kept for the tab only
    live.play(rate=100, limit=5)  # the websocket takes the key as ?token=

    live.page.evaluate("() => sessionStorage.setItem('rnnserve.apiKey', 'wrong-key')")
    live.page.click("#close")
    live.wait_for_state("closed")
    live.page.click("#start")
    live.wait_for_state("failed")
    live.wait_for_error("API key missing or refused: unauthorized: the API key is not valid")


def test_live_load_follows_other_clients(server: LiveServer, live: LivePage) -> None:
    stop = threading.Event()
    load = threading.Thread(target=_step_until, args=(server.http_url, stop), daemon=True)
    load.start()
    try:
        live.page.wait_for_function(
            "() => Number(document.querySelector('[data-metric=steps] output').textContent) > 0"
        )
        live.page.wait_for_function(
            "() => Number(document.querySelector('[data-metric=sessions] output').textContent) >= 1"
        )
        live.page.wait_for_function(
            "() => Number(document.querySelector('#model-rows .sessions').textContent) >= 1"
        )
    finally:
        stop.set()
        load.join(10)
    assert live.console_errors == []


def _step_until(base_url: str, stop: threading.Event) -> None:
    """A small load test: one session stepped over HTTP as fast as it goes."""
    with httpx.Client(base_url=base_url) as client:
        session_id = client.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
        while not stop.is_set():
            client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[0.1], [0.2]]})


def test_phone_sized_screen_does_not_overflow(
    server: LiveServer, open_page: Callable[..., LivePage]
) -> None:
    live = open_page(server.http_url, viewport=PHONE, is_mobile=True, has_touch=True)
    live.wait_for_models()
    width = live.page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    assert width[0] <= width[1] == PHONE["width"]
    controls = live.page.eval_on_selector_all(
        "#stream button, #stream select, #stream input, #key-toggle",
        "els => els.filter(e => e.offsetParent).map(e => e.getBoundingClientRect().right)",
    )
    assert controls and max(controls) <= PHONE["width"]
    live.page.fill("#limit", "5")
    live.page.tap("#start")
    live.wait_for_state("finished")
    assert live.step_count() == 5
    assert live.page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]


def test_screenshot_of_the_streaming_chart(
    server: LiveServer, open_page: Callable[..., LivePage], tmp_path: Path
) -> None:
    live = open_page(server.http_url, viewport={"width": 1280, "height": 900})
    live.wait_for_models()
    live.start(rate=20)
    # Taken while it streams: most of the example drawn, a few seconds of load charted.
    live.wait_for_steps(85)
    live.page.wait_for_function(
        "() => document.querySelector('[data-metric=steps] canvas').dataset.drawnSteps >= 3"
    )
    path = tmp_path / "live-page.png"
    live.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 20_000
    docs_assets = os.environ.get("RNNSERVE_DOCS_ASSETS")
    if docs_assets:
        Path(docs_assets).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(docs_assets) / "live-page.png")
