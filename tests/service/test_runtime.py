"""ONNX Runtime: session options, and which providers are asked for (CUDA only where it runs)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest
from loopback import HOST, free_port

from service.engine import runtime
from service.engine.runtime import (
    CPU,
    CUDA,
    CudaStatus,
    probe_cuda,
    provider_list,
    resolve_providers,
    session_options,
)

ROOT = Path(__file__).resolve().parents[2]

SPINNING = "session.intra_op.allow_spinning"


@pytest.mark.parametrize(
    ("threads", "on_cpu", "expected"),
    [
        pytest.param(0, True, 1, id="default-on-cpu-is-one-thread"),
        pytest.param(0, False, 0, id="default-elsewhere-is-onnxruntime-default"),
        pytest.param(3, True, 3, id="explicit-on-cpu"),
        pytest.param(2, False, 2, id="explicit-elsewhere"),
    ],
)
def test_intra_op_threads(threads: int, on_cpu: bool, expected: int) -> None:
    assert session_options(threads, on_cpu=on_cpu).intra_op_num_threads == expected


def test_idle_threads_do_not_spin() -> None:
    assert session_options(4, on_cpu=True).get_session_config_entry(SPINNING) == "0"


# -- which providers to ask for ----------------------------------------------------------------


def _this_process() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # a library that loads anywhere; the device count is injected


def _driver_missing() -> ctypes.CDLL:
    raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")


@pytest.mark.parametrize(
    ("available", "load_driver", "count", "reason"),
    [
        pytest.param(
            [CPU], _this_process, (0, 1), "has no CUDA provider (CPU build)", id="cpu-build"
        ),
        pytest.param([CUDA, CPU], _driver_missing, (0, 1), "no NVIDIA driver", id="no-driver"),
        pytest.param([CUDA, CPU], _this_process, (100, 0), "CUDA error 100", id="no-device"),
        pytest.param([CUDA, CPU], _this_process, (0, 0), "sees no GPU", id="zero-devices"),
    ],
)
def test_cuda_is_not_usable_without_provider_driver_or_gpu(
    available: list[str],
    load_driver: Callable[[], ctypes.CDLL],
    count: tuple[int, int],
    reason: str,
) -> None:
    status = probe_cuda(lambda: available, load_driver, lambda driver: count)
    assert not status.usable
    assert reason in status.reason


def test_cuda_is_usable_with_driver_and_a_gpu() -> None:
    assert probe_cuda(lambda: [CUDA, CPU], _this_process, lambda d: (0, 2)).usable


@pytest.mark.parametrize(
    ("wanted", "usable", "expected"),
    [
        pytest.param([CUDA, CPU], False, [CPU], id="no-gpu-drops-cuda"),
        pytest.param([CUDA, CPU], True, [CUDA, CPU], id="gpu-keeps-cuda"),
        pytest.param([CUDA], False, [CPU], id="cpu-always-remains"),
        pytest.param(["DmlExecutionProvider", CPU], False, [CPU], id="not-installed-dropped"),
    ],
)
def test_resolve_providers(wanted: list[str], usable: bool, expected: list[str]) -> None:
    assert resolve_providers(wanted, lambda: CudaStatus(usable, "test")) == expected


def test_cpu_only_never_probes_cuda() -> None:
    def probe() -> CudaStatus:
        raise AssertionError("probed")

    assert resolve_providers([CPU], probe) == [CPU]


def test_no_gpu_logs_one_info_line_and_never_preloads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "probe_cuda", lambda: CudaStatus(False, "no NVIDIA driver (x)"))
    monkeypatch.setattr(runtime, "preload_cuda_libraries", lambda: pytest.fail("preloaded"))
    runtime.cuda_status.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="service.engine.runtime"):
            for _ in range(3):
                assert resolve_providers([CUDA, CPU]) == [CPU]
    finally:
        runtime.cuda_status.cache_clear()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "CUDA provider not used, running on the CPU provider: no NVIDIA driver (x)")
    ]


def test_a_gpu_preloads_the_cuda_libraries_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(runtime, "probe_cuda", lambda: CudaStatus(True))
    monkeypatch.setattr(runtime, "preload_cuda_libraries", lambda: calls.append("preload"))
    runtime.cuda_status.cache_clear()
    try:
        assert runtime.cuda_status().usable
        assert runtime.cuda_status().usable
    finally:
        runtime.cuda_status.cache_clear()
    assert calls == ["preload"]


def test_preload_is_skipped_where_onnxruntime_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ort, "preload_dlls", raising=False)  # the CPU package before 1.21
    runtime.preload_cuda_libraries()


def test_tf32_is_off_unless_asked_for() -> None:
    assert provider_list([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert provider_list([CUDA, CPU], cuda_tf32=True)[0] == (CUDA, {"use_tf32": "1"})
    assert provider_list([CPU], cuda_tf32=True) == [CPU]


def test_a_cpu_start_prints_no_error_lines(tmp_path: Path) -> None:
    """The real service, asked for CUDA (the default) on a machine without a GPU."""
    if probe_cuda().usable:
        pytest.skip("this machine has a GPU")
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--models-dir", "models"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    log = tmp_path / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)
        try:
            _wait_ready(port, process)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    lines = log.read_text().splitlines()
    errors = [line for line in lines if re.search(r"\[E:|ERROR|error|Failed|\x1b\[1;31m", line)]
    assert not errors, "\n".join(lines)
    assert any("CUDA provider not used, running on the CPU provider" in line for line in lines)
    assert any("serving co2-forecaster/1 on CPUExecutionProvider" in line for line in lines)


def _wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail("the service did not become ready")
