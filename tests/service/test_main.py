"""``python -m service`` as a user starts it: a real process on a loopback port."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from service.__main__ import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def process(models_dir: Path, unused_port: int) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = unused_port
    env = {
        **os.environ,
        "RNNSERVE_PROVIDERS": "CPUExecutionProvider",
        "RNNSERVE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*command, "--models-dir", str(models_dir)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "the service exited during startup"
        assert time.monotonic() < deadline, "the service did not become ready"
        try:
            if httpx.get(url + "/health/ready").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_serves_and_shuts_down_cleanly(
    process: tuple[subprocess.Popen[bytes], str],
) -> None:

    proc, url = process
    models = httpx.get(url + "/v1/models").json()["models"]
    assert [m["version"] for m in models] == [1, 2]
    ws_url = url.replace("http", "ws") + "/v1/stream?model=tiny"
    async with websockets.connect(ws_url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"inputs": [[1.0, 2.0]]}))
        assert json.loads(await ws.recv())["step_count"] == 1
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012  # service restart
    assert proc.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal


def test_bad_settings_exit_with_a_message(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "-m", "service", "--models-dir", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "invalid settings" in result.stderr and "does not exist" in result.stderr


def test_tune_gc_freezes_what_exists_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000  # the modules imported so far
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
