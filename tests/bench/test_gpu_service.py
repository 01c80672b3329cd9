"""bench/gpu_service.py in its CPU form: the same script that runs on the GPU machine, small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_service.py"


def test_cpu_form_serves_drives_checks_and_prints_one_table(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    command = [sys.executable, str(SCRIPT), "--provider", "cpu", "--sessions", "4"]
    command += ["--duration", "1.5", "--warmup", "0.5", "--processes", "1"]
    command += ["--call-budget-s", "0.1", "--out", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = report.read_text().splitlines()
    assert lines[0].startswith("machine: ")
    header = next(i for i, line in enumerate(lines) if line.startswith("mode "))
    assert "srv cpu us/step" in lines[header] and "batch run ms" in lines[header]
    rows = [line.split() for line in lines[header + 2 :] if line.split()[0] in ("ws", "http")]
    assert {row[0] for row in rows} >= {"ws", "http"}
    for row in rows:
        assert row[1] == "4" and row[5:7] == ["0", "0"]  # sessions; no errors, no mismatches
        assert int(row[7].replace(",", "")) > 0  # steps checked against the CPU reference
    assert sum(line.startswith("model call, batch 1") for line in lines) == 2
    assert "CPUExecutionProvider" in done.stdout


def test_a_wrong_provider_fails_the_run(tmp_path: Path) -> None:
    """Asked for CUDA on a machine without a GPU: the service says CPU, the script exits 1."""
    command = [sys.executable, str(SCRIPT), "--provider", "cuda", "--sessions", "2"]
    command += ["--duration", "1", "--warmup", "0.2", "--processes", "1", "--modes", "ws"]
    command += ["--call-budget-s", "0.05"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=240)
    if "CUDAExecutionProvider" in done.stdout.split("service:", 1)[-1].split("\n", 1)[0]:
        return  # a machine with a GPU: nothing to show here
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the service runs on CPUExecutionProvider, not CUDAExecutionProvider" in done.stdout
    assert "Traceback" not in done.stderr
