"""The streaming client against a real server: ``python -m service`` on a free loopback port.

Predictions printed by the client must equal the stateless ``/predict`` of the whole series, also
when the connection drops mid-stream (cut by a proxy at a chosen websocket frame) and is resumed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from loopback import HOST, free_port

from service.client import ClientError, RetryPolicy, StreamClient, StreamTarget
from service.client.__main__ import main
from service.client.series import SeriesError, iter_text_rows, read_csv_rows
from training.export import export_model
from training.model import ModelConfig, RecurrentModel

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


# ----------------------------------------------------------------------------- fixtures


def _export(models_dir: Path, name: str, input_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(
        cell="gru",
        input_size=input_size,
        hidden_size=8,
        output_size=1,
        input_mean=(1.0,) * input_size,
        input_std=(2.0,) * input_size,
        output_mean=(5.0,),
        output_std=(3.0,),
    )
    export_model(RecurrentModel(config), models_dir / name / "1", name=name, version=1)


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    _export(root, "tiny", 1, seed=1)
    _export(root, "pair", 2, seed=2)
    return root


@contextmanager
def running_server(models_dir: Path, **settings: str) -> Iterator[str]:
    """A real service process with ``RNNSERVE_*`` settings; yields its base URL (http://...)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port)]
    env = os.environ | {
        "RNNSERVE_MODELS_DIR": str(models_dir),
        "RNNSERVE_PROVIDERS": "CPUExecutionProvider",
        "RNNSERVE_LOG_LEVEL": "warning",
    }
    env |= {f"RNNSERVE_{name.upper()}": value for name, value in settings.items()}
    log = models_dir.parent / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stderr=sink)
    url = f"http://{HOST}:{port}"
    try:
        _wait_ready(process, url, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def service_url(exported_models: Path) -> Iterator[str]:
    with running_server(exported_models) as url:
        yield url


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited during startup:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server was not ready within 60 s")


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.round(rng.normal(1.0, 2.0, size=(STEPS, 2)), 4)  # (T, 2)


@pytest.fixture
def csv_file(tmp_path: Path, series: np.ndarray) -> Path:
    lines = ["time,a,b"] + [f"{t},{a},{b}" for t, (a, b) in enumerate(series)]
    path = tmp_path / "series.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def reference(url: str, model: str, inputs: np.ndarray) -> np.ndarray:
    """The stateless /predict of the whole series: what streaming must reproduce."""
    reply = httpx.post(f"{url}/v1/models/{model}/predict", json={"inputs": [inputs.tolist()]})
    assert reply.status_code == 200, reply.text
    return np.array(reply.json()["outputs"][0])  # (T, 1)


def step_count(url: str, session_id: str) -> int:
    reply = httpx.get(f"{url}/v1/sessions/{session_id}")
    assert reply.status_code == 200, reply.text
    return int(reply.json()["step_count"])


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://")


def parse_text_lines(text: str) -> dict[int, tuple[list[float], list[float]]]:
    """``step<TAB>inputs<TAB>outputs`` lines as {step: (inputs, outputs)}."""
    parsed = {}
    for line in text.splitlines():
        step, inputs, outputs = line.split("\t")
        parsed[int(step)] = (
            [float(v) for v in inputs.split(",")],
            [float(v) for v in outputs.split(",")],
        )
    return parsed


def session_of(stderr: str) -> str:
    match = re.search(r"to session (\S+) ", stderr)
    assert match, stderr
    return match.group(1)


# ----------------------------------------------------------------------------- a proxy that cuts


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


@pytest.fixture
def cutter(service_url: str) -> Iterator[Callable[..., FrameCutter]]:
    made: list[FrameCutter] = []
    port = int(service_url.rsplit(":", 1)[1])

    def make(**cuts: int) -> FrameCutter:
        proxy = FrameCutter(port, **cuts)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    ("chunk", "output_format"),
    [
        pytest.param(1, "text", id="chunk-1-text"),
        pytest.param(7, "text", id="chunk-7-text"),
        pytest.param(3, "json", id="chunk-3-json"),
    ],
)
def test_stream_prints_the_whole_series_predictions(
    service_url: str,
    csv_file: Path,
    series: np.ndarray,
    chunk: int,
    output_format: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    argv = [
        "stream",
        "--url",
        ws_url(service_url),
        "--model",
        "tiny",
        "--csv",
        str(csv_file),
        "--column",
        "a",
        "--chunk",
        str(chunk),
    ]
    assert main([*argv, "--json"] if output_format == "json" else argv, out) == 0

    if output_format == "json":
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        steps = {r["step"]: (r["input"], r["output"]) for r in records}
    else:
        steps = parse_text_lines(out.getvalue())
    assert sorted(steps) == list(range(STEPS))
    want = reference(service_url, "tiny", series[:, :1])
    np.testing.assert_allclose([steps[t][1] for t in range(STEPS)], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal([steps[t][0] for t in range(STEPS)], series[:, :1])
    assert step_count(service_url, session_of(capsys.readouterr().err)) == STEPS


def test_stream_several_columns(
    service_url: str, csv_file: Path, series: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    argv = [
        "stream",
        "--url",
        ws_url(service_url),
        "--model",
        "pair",
        "--csv",
        str(csv_file),
        "--columns",
        "a,b",
        "--chunk",
        "5",
    ]
    assert main(argv, out) == 0
    steps = parse_text_lines(out.getvalue())
    want = reference(service_url, "pair", series)
    np.testing.assert_allclose([steps[t][1] for t in range(STEPS)], want, rtol=1e-5, atol=1e-5)


def test_resume_with_session_id_skips_the_applied_rows(
    service_url: str,
    csv_file: Path,
    series: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    head = tmp_path / "head.csv"
    head.write_text("\n".join(csv_file.read_text().splitlines()[:11]) + "\n")  # header + 10 rows
    base = ["stream", "--url", ws_url(service_url), "--column", "a", "--chunk", "4"]
    assert main([*base, "--model", "tiny", "--csv", str(head)], io.StringIO()) == 0
    session_id = session_of(capsys.readouterr().err)

    out = io.StringIO()
    assert main([*base, f"--session-id={session_id}", "--csv", str(csv_file)], out) == 0
    steps = parse_text_lines(out.getvalue())
    assert sorted(steps) == list(range(10, STEPS))
    want = reference(service_url, "tiny", series[:, :1])
    np.testing.assert_allclose([steps[t][1] for t in range(10, STEPS)], want[10:], rtol=1e-5)
    assert "already applied 10 steps" in capsys.readouterr().err
    assert step_count(service_url, session_id) == STEPS


def test_dropped_connection_before_a_chunk_arrives_is_resent(
    service_url: str,
    cutter: Callable[..., FrameCutter],
    csv_file: Path,
    series: np.ndarray,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = cutter(client_frame=5)  # the 6th chunk never reaches the server
    out = io.StringIO()
    argv = [
        "stream",
        "--url",
        f"ws://{HOST}:{proxy.port}",
        "--model",
        "tiny",
        "--csv",
        str(csv_file),
        "--column",
        "a",
        "--chunk",
        "3",
    ]
    assert main(argv, out) == 0

    assert (proxy.cuts, proxy.connections) == (1, 2)
    steps = parse_text_lines(out.getvalue())
    assert sorted(steps) == list(range(STEPS))
    want = reference(service_url, "tiny", series[:, :1])
    np.testing.assert_allclose([steps[t][1] for t in range(STEPS)], want, rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "resumed session" in err and "at step 15" in err
    assert step_count(service_url, session_of(err)) == STEPS


async def test_dropped_reply_is_not_applied_twice(
    service_url: str, cutter: Callable[..., FrameCutter], series: np.ndarray
) -> None:
    proxy = cutter(server_frame=4)  # chunk 3 (steps 9..11) is applied, its reply is lost
    notices: list[str] = []
    target = StreamTarget(f"ws://{HOST}:{proxy.port}", model="tiny")
    client = StreamClient(target, chunk_size=3, notify=notices.append)
    rows = series[:, :1].tolist()
    results = [result async for result in client.stream(rows)]

    assert (proxy.cuts, proxy.connections) == (1, 2)
    assert client.lost_steps == [9, 10, 11]
    assert [r.index for r in results] == [t for t in range(STEPS) if t not in (9, 10, 11)]
    want = reference(service_url, "tiny", series[:, :1])
    got = np.array([r.outputs for r in results])
    np.testing.assert_allclose(got, np.delete(want, [9, 10, 11], axis=0), rtol=1e-5, atol=1e-5)
    assert client.session is not None
    assert step_count(service_url, client.session.session_id) == STEPS
    assert any("steps 9..11 were applied" in notice for notice in notices)


def test_stdin_mode_streams_each_line(
    service_url: str, series: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "# a comment\n" + "\n".join(f"{a}, {b}" for a, b in series[:12]) + "\n\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    out = io.StringIO()
    assert main(["stream", "--url", ws_url(service_url), "--model", "pair", "--stdin"], out) == 0
    steps = parse_text_lines(out.getvalue())
    want = reference(service_url, "pair", series[:12])
    np.testing.assert_allclose([steps[t][1] for t in range(12)], want, rtol=1e-5, atol=1e-5)


def test_a_reader_that_stops_early_ends_the_client_quietly(
    service_url: str, csv_file: Path
) -> None:
    command = [sys.executable, "-m", "service.client", "stream", "--url", ws_url(service_url)]
    command += ["--model", "tiny", "--csv", str(csv_file), "--column", "a"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().startswith("0\t")  # like `... | head -1`
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert "Traceback" not in process.stderr.read()
    process.stderr.close()


# ----------------------------------------------------------------------------- errors


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service.client", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_unknown_model_exits_non_zero_with_the_servers_message(
    service_url: str, csv_file: Path
) -> None:
    done = run_cli(
        "stream",
        "--url",
        ws_url(service_url),
        "--model",
        "nope",
        "--csv",
        str(csv_file),
        "--column",
        "a",
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: server closed the stream: model 'nope' not found; available models: pair, tiny "
        "(close code 4404)"
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(["--version", "9"], "model 'tiny' has no version 9", id="unknown-version"),
        pytest.param(
            ["--columns", "a,b"],
            "server rejected steps 0..0: 'inputs[0]' has 2 values; the model expects 1",
            id="wrong-feature-count",
        ),
    ],
)
def test_server_errors_exit_non_zero(
    service_url: str,
    csv_file: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["stream", "--url", ws_url(service_url), "--model", "tiny", "--csv", str(csv_file)]
    if "--columns" not in extra:
        argv += ["--column", "a"]
    out = io.StringIO()
    assert main([*argv, *extra], out) == 1
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_unknown_session_id_exits_non_zero(
    service_url: str, csv_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "stream",
        "--url",
        ws_url(service_url),
        "--session-id",
        "no-such-session",
        "--csv",
        str(csv_file),
        "--column",
        "a",
    ]
    assert main(argv, io.StringIO()) == 1
    assert "session 'no-such-session' not found (close code 4404)" in capsys.readouterr().err


def test_api_key_is_sent_and_a_wrong_one_is_final(
    exported_models: Path, csv_file: Path, series: np.ndarray, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_server(exported_models, api_keys="k1,k2") as url:
        argv = ["stream", "--url", ws_url(url), "--model", "tiny", "--csv", str(csv_file)]
        argv += ["--column", "a", "--chunk", "8"]
        out = io.StringIO()
        assert main([*argv, "--api-key", "k2"], out) == 0
        assert sorted(parse_text_lines(out.getvalue())) == list(range(STEPS))
        capsys.readouterr()

        for wrong in (["--api-key", "k3"], []):
            out = io.StringIO()
            assert main([*argv, *wrong], out) == 1
            assert out.getvalue() == ""
            err = capsys.readouterr().err
            assert err.startswith("error: server closed the stream: unauthorized")
            assert err.endswith("(close code 4401)\n")


def test_unreachable_server_gives_up_after_the_retries(
    csv_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    argv = [
        "stream",
        "--url",
        f"ws://{HOST}:{port}",
        "--model",
        "tiny",
        "--csv",
        str(csv_file),
        "--column",
        "a",
        "--max-retries",
        "2",
    ]
    assert main(argv, io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err.count("notice: connection lost") == 2
    assert f"error: cannot reach ws://{HOST}:{port}/v1/stream?model=tiny after 3 attempts" in err


def test_deleted_session_is_a_clear_error(service_url: str, series: np.ndarray) -> None:
    """A session that disappears mid-stream (deleted, expired, server restarted) is final."""

    async def scenario() -> str:
        target = StreamTarget(ws_url(service_url), model="tiny")
        client = StreamClient(target, retry=RetryPolicy(initial_delay=0.05))
        rows = iter(series[:, :1].tolist())
        stream = client.stream(rows)
        await anext(stream)
        assert client.session is not None
        httpx.delete(f"{service_url}/v1/sessions/{client.session.session_id}")
        with pytest.raises(ClientError) as caught:
            async for _ in stream:
                pass
        return str(caught.value)

    message = asyncio.run(scenario())
    assert re.search(r"session \S+ is gone .* after 1 acknowledged steps", message), message


@pytest.mark.parametrize(
    ("content", "columns", "message"),
    [
        pytest.param(None, ["a"], "cannot read", id="missing-file"),
        pytest.param("", ["a"], "is empty; expected a header line", id="empty"),
        pytest.param("a,b\n", ["a"], "has a header but no data lines", id="header-only"),
        pytest.param("a,b\n1,2\n", ["c"], "no column 'c'; the header has 'a', 'b'", id="column"),
        pytest.param(
            "a,b\n1,2\n3,x\n", ["b"], "line 3, column 'b': 'x' is not a number", id="text"
        ),
        pytest.param("a,b\n1,2\n,4\n", ["a"], "line 3, column 'a': missing value", id="blank"),
        pytest.param("a,b\n1,2\n3\n", ["b"], "line 3, column 'b': missing value", id="short"),
        pytest.param("a\nnan\n", ["a"], "line 2, column 'a': 'nan' is not a finite", id="nan"),
    ],
)
def test_bad_csv_names_the_line_and_column(
    tmp_path: Path, content: str | None, columns: list[str], message: str
) -> None:
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SeriesError, match=re.escape(message)):
        read_csv_rows(path, columns)


def test_bad_csv_exits_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a\n1\n2x\n")
    argv = [
        "stream",
        "--url",
        f"ws://{HOST}:9",
        "--model",
        "tiny",
        "--csv",
        str(path),
        "--column",
        "a",
    ]
    assert main(argv, io.StringIO()) == 1
    assert capsys.readouterr().err == f"error: {path} line 3, column 'a': '2x' is not a number\n"


def test_csv_rows_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("t,a\n0,1.5\n\n1,-2e-3\n")
    assert read_csv_rows(path, ["a"]) == [[1.5], [-0.002]]


def test_stdin_rows_must_keep_their_width() -> None:
    rows = iter_text_rows(io.StringIO("1 2\n3,4\n5\n"))
    assert [next(rows), next(rows)] == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(SeriesError, match="stdin line 3: 1 values, earlier lines had 2"):
        next(rows)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({}, "give either a model", id="neither"),
        pytest.param({"model": "m", "session_id": "s"}, "give either a model", id="both"),
        pytest.param({"model": "m", "version": 0}, "version must be a positive", id="version"),
    ],
)
def test_target_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ClientError, match=message):
        StreamTarget("ws://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


def test_stream_url_forms() -> None:
    new = StreamTarget("http://h:1/", model="co2 model", version=2)
    assert new.stream_url(None) == "ws://h:1/v1/stream?model=co2+model&version=2"
    assert new.stream_url("abc") == "ws://h:1/v1/stream?session_id=abc"
    assert (
        StreamTarget("wss://h/v1/stream", model="m").stream_url(None) == "wss://h/v1/stream?model=m"
    )
    with pytest.raises(ClientError, match="invalid server URL 'h:1'"):
        StreamTarget("h:1", model="m").stream_url(None)
