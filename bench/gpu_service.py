"""The whole service on the GPU: start it on the CUDA provider, drive it, check it, print one table.

    python bench/gpu_service.py                                   # on a machine with a GPU
    python bench/gpu_service.py --provider cpu --sessions 8 --duration 2 --warmup 0.5   # CI form
    python bench/gpu_service.py --prepare-wheels .gpuwheels       # here, before a GPU run

It starts ``python -m service`` on the default model (or ``--model``) with the CUDA provider and
the device state pool (the service's defaults on CUDA: states on the GPU, single steps replayed
as CUDA graphs), checks that the service reports the provider asked for and that its log holds no
error line, then runs the load generator (``bench/loadgen.py``) against it for every mode it
offers (``--modes``; ws and http, plus mux, v2 and grpc where the load generator has them) for a
bounded time. Every output of every session is compared with a sequential reference computed on
the CPU provider (TF32 is off in the service by default, so the tolerance is 1e-5). The table
gives steps/s, p50/p99 latency, the server's CPU time per answered step, the mean batch and, where
the service reports ``batch_run_ms`` in ``/v1/stats``, the time of one model call per batch. A
footer times the model call alone (``DevicePool.step`` at batch 1, with and without CUDA graphs).
Exits 1 if the provider is wrong, the log has errors, or any step failed or differed.

For a GPU machine without a package index: ``--prepare-wheels DIR`` (run where PyPI is
reachable) downloads the serving wheels for CPython 3.12 on manylinux x86-64 (no numpy, onnx or
onnxruntime, which that machine has or gets apart); there, ``--wheels DIR`` installs them into
``--site`` and puts that on the path of this script and of the service (docs/how-to/gpu.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
CANDIDATE_MODES = ("ws", "http", "mux", "v2", "grpc")
# Lines of the service's log that mean something went wrong (ONNX Runtime's own errors are
# "[E:onnxruntime:..." in red; Python's logging writes " ERROR ").
ERROR_LINE = re.compile(r"\[E:onnxruntime| ERROR |Traceback|Failed to create CUDAExecutionProvider")
# Serving packages a GPU machine without a package index is expected to have already (numpy, onnx
# with protobuf) or to get apart (onnxruntime-gpu, see docs/how-to/gpu.md).
CARRIED_EXCLUDE = {"numpy", "onnx", "protobuf"}


# ----------------------------------------------------------------------------- wheels


def prepare_wheels(folder: Path) -> None:
    """Download the serving wheels (CPython 3.12, manylinux x86-64) for a machine without PyPI."""
    pins = [
        line
        for line in _pins(ROOT / "deploy" / "requirements-serve.txt")
        if _name(line) not in CARRIED_EXCLUDE
    ]
    folder.mkdir(parents=True, exist_ok=True)
    platform_args = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder)]
    command += ["--only-binary=:all:", *platform_args, "--python-version", "3.12"]
    command += ["--implementation", "cp", *pins]
    subprocess.run(command, check=True)
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {folder}")


def _pins(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>~! ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def install_wheels(folder: Path, site: Path) -> None:
    """Install every wheel in ``folder`` into ``site`` (no index, no dependency resolution)."""
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: no wheels in {folder}")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    command += ["--no-compile", "--upgrade", "--target", str(site), *wheels]
    subprocess.run(command, check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site), os.environ.get("PYTHONPATH")])
    )


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Result:
    """A load generator row and what this script adds to it."""

    row: Any  # loadgen.Row: mode, sessions, steps/s, latency, errors, mismatches, CPU, batch
    batch_run_ms: str  # p50/p99 of one model call per batch, from /v1/stats, or "n/a"


def available_modes(loadgen: Any) -> list[str]:
    """The modes the load generator offers, in this script's order."""
    return [mode for mode in CANDIDATE_MODES if mode in loadgen.MODES]


def service_env(loadgen: Any, args: argparse.Namespace, max_sessions: int) -> dict[str, str]:
    """loadgen's service environment (batching on), with the device pool and info logging (the
    log is searched for CUDA notes and errors), then ``--server-env``."""
    env = loadgen.service_env(True, args.provider == "cuda", max_sessions)
    env |= {"RNNSERVE_STATE_POOL": "device", "RNNSERVE_LOG_LEVEL": "info"}
    return env | dict(item.split("=", 1) for item in args.server_env)


def batch_run_ms(loadgen: Any, server: Any) -> str:
    """p50/p99 of ``batch_run_ms`` from /v1/stats, where the service reports it."""
    for key, value in loadgen.walk_items(server.get_json("/v1/stats")):
        if key == "batch_run_ms" and isinstance(value, dict):
            p50, p99 = value.get("p50"), value.get("p99")
            if p50 is not None and p99 is not None:
                return f"{float(p50):.3f}/{float(p99):.3f}"
    return "n/a"


def measure(loadgen: Any, args: argparse.Namespace) -> tuple[list[Result], list[str]]:
    """Serve, drive every mode and session count, and return the rows and the problems found."""
    model = loadgen.load_model(args.models_dir, args.model, None)
    argv = ["--models-dir", str(args.models_dir), "--model", model.name, "--targets", "none"]
    argv += ["--sessions", args.sessions, "--duration", str(args.duration)]
    argv += ["--warmup", str(args.warmup), "--modes", ",".join(args.modes)]
    argv += ["--processes", str(args.processes)]
    load_args = loadgen.parse_args(argv)
    port = loadgen.free_port()
    max_sessions = sum(load_args.sessions) * len(load_args.modes) + 1000
    results, problems = [], []
    with tempfile.NamedTemporaryFile("w+", prefix="gpu-service-", suffix=".log") as log:
        env = service_env(loadgen, args, max_sessions)
        with _server(loadgen, model, port, env, log) as server:
            provider = loadgen.provider_in_use(server)
            if provider != PROVIDERS[args.provider]:
                problems.append(f"the service runs on {provider}, not {PROVIDERS[args.provider]}")
            print(f"service: {model.describe()} on {provider}; {_settings(env)}", flush=True)
            print(loadgen.HEADER, flush=True)
            for row in loadgen.measure("gpu", server, model, load_args):
                results.append(Result(row, batch_run_ms(loadgen, server)))
        log.seek(0)
        lines = log.read().splitlines()
    problems += [f"service log: {line}" for line in lines if ERROR_LINE.search(line)][:10]
    for row in (result.row for result in results):
        if row.errors or row.mismatches or not row.steps:
            problems.append(
                f"{row.mode} x {row.sessions}: {row.errors} errors, {row.mismatches} "
                f"mismatches, {row.steps} steps checked"
            )
    notes = [line.split(": ", 1)[-1] for line in lines if "step graphs" in line or "CUDA" in line]
    return results, problems + [f"note: {n}" for n in notes[:5]]


@contextlib.contextmanager
def _server(loadgen: Any, model: Any, port: int, env: dict[str, str], log: Any) -> Any:
    """The service on ``port`` (and gRPC on a free port), its output in ``log`` (loadgen's
    start_server deletes its log)."""
    grpc_port = loadgen.free_port()
    command = loadgen.service_command(model, port, grpc_port)
    process = subprocess.Popen(
        command, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )
    server = loadgen.Server(process, port, Path(log.name), grpc_port)
    try:
        loadgen._wait_ready(server, process, Path(log.name), timeout=300.0)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _settings(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


# ----------------------------------------------------------------------------- model call alone


def model_call_lines(args: argparse.Namespace) -> list[str]:
    """``DevicePool.step`` at batch 1 on the served model: plain, and on the bucket graphs."""
    sys.path.insert(0, str(BENCH))
    import gpu_bench

    model = gpu_bench.Model.read(args.models_dir / args.model / _version(args))
    lines = []
    for path, buckets in (("plain", ()), ("graph", (1,))):
        pool = gpu_bench.device_pool(model, args.provider, 8, tf32=False, buckets=buckets)
        row = gpu_bench.time_calls(gpu_bench.device_step(pool), model, 1, 8, args.call_budget_s)
        label = "CUDA graph" if path == "graph" and args.provider == "cuda" else path
        lines.append(
            f"model call, batch 1, {label}: p50 {row.p50_ms * 1e3:.0f} us, "
            f"p99 {row.p99_ms * 1e3:.0f} us ({row.calls} calls)"
        )
    return lines


def _version(args: argparse.Namespace) -> str:
    versions = [p.name for p in (args.models_dir / args.model).iterdir() if p.name.isdigit()]
    return max(versions, key=int)


# ----------------------------------------------------------------------------- report


HEADER = (
    f"{'mode':<6}{'sessions':>9}{'steps/s':>13}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    f"{'mismatch':>10}{'checked':>11}{'srv cpu us/step':>17}{'batch':>8}"
    f"{'batch run ms p50/p99':>22}"
)


def table(results: list[Result]) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    for result in results:
        r = result.row
        lines.append(
            f"{r.mode:<6}{r.sessions:>9}{r.steps_per_s:>13,.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.errors:>8}{r.mismatches:>10}{r.steps:>11,}{r.server_us_per_step:>17.1f}"
            f"{r.mean_batch:>8.1f}{result.batch_run_ms:>22}"
        )
    return "\n".join(lines)


NO_RUN_MS = (
    "batch run ms: n/a where the service does not report batch_run_ms in /v1/stats; the model "
    "call alone is timed below"
)


def machine(provider: str) -> str:
    import onnxruntime as ort

    from training import timing

    line = f"{timing.cpu_model()}, {os.cpu_count()} cores"
    if provider == "cuda":
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        try:
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
            line += f"; GPU {gpu.stdout.strip()}"
        except (OSError, subprocess.SubprocessError) as exc:
            line += f"; GPU unknown ({exc})"
    return f"machine: {line}; Python {platform.python_version()}; onnxruntime {ort.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="co2-forecaster")
    parser.add_argument("--modes", help="comma-separated (default: every mode loadgen offers)")
    parser.add_argument("--sessions", default="256,4096", help="comma-separated session counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not counted")
    parser.add_argument("--processes", type=int, default=4, help="load generator processes")
    parser.add_argument(
        "--call-budget-s", type=float, default=1.0, help="seconds per model call row"
    )
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (no index)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/gpu-service-site"))
    parser.add_argument("--prepare-wheels", type=Path, metavar="DIR", help="download, then exit")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_wheels:
        prepare_wheels(args.prepare_wheels)
        return 0
    if args.wheels:
        install_wheels(args.wheels, args.site)
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    import loadgen

    args.modes = args.modes.split(",") if args.modes else available_modes(loadgen)
    started = time.perf_counter()
    results, problems = measure(loadgen, args)
    calls = [] if any("the service runs on" in p for p in problems) else model_call_lines(args)
    report = "\n".join(
        [
            machine(args.provider),
            f"model {args.model}; modes {','.join(args.modes)}; {args.duration:g} s per row "
            f"({args.warmup:g} s warm-up); outputs checked against the CPU provider (1e-5)",
            table(results),
            *([NO_RUN_MS] if any(r.batch_run_ms == "n/a" for r in results) else []),
            *calls,
            *problems,
            f"total {time.perf_counter() - started:.0f} s",
        ]
    )
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")
    failed = [p for p in problems if not p.startswith("note: ")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
