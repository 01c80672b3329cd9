"""Load generator: N concurrent streaming sessions against the service (batching on, off) and echo.

Each session is closed-loop: it sends one step per frame (or HTTP request) and waits for the reply
before sending the next, for ``--duration`` seconds. Its inputs come from a per-session seed, so
every output is checked afterwards against a sequential reference computed with ONNX Runtime
directly on the model file, step by step. In one run it measures, on fresh server processes on
free loopback ports:

- ``on``: the service with cross-session batching (its defaults),
- ``off``: the service with ``RNNSERVE_MAX_BATCH_SIZE=1`` (one ONNX Runtime call per step),
- ``echo``: ``bench/echo_server.py``, the same FastAPI + uvicorn stack with no model (the ceiling),

and prints one table with the machine, then the ratios on/off and on/echo. ``--memory K`` also
creates K idle sessions over HTTP and reports the growth of the server's resident memory.

    python bench/loadgen.py --synthetic mgu:2:512 --sessions 256,1024 --duration 10
    python bench/loadgen.py --models-dir models --model co2-forecaster --quick
    python bench/loadgen.py --synthetic mgu:2:256 --memory 100000 --targets none
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import orjson
from websockets.asyncio.client import connect

from service.engine.runtime import session_options
from service.grpc.proto import grpc_service_pb2 as pb
from service.grpc.proto import grpc_service_pb2_grpc as pb_grpc
from training import timing

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
BLOCK = 512  # input rows generated per session at a time
CONNECT_CONCURRENCY = 64  # sessions opened at once before the run starts
MODES = ("ws", "http", "v2", "mux", "grpc")
ECHO_MODES = ("ws", "http", "grpc")  # what bench/echo_server.py speaks

# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    """A model on disk, as the reference and the load generator need it."""

    models_dir: Path  # the folder served with --models-dir
    name: str
    version: int
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.models_dir / self.name / str(self.version) / "model.onnx"

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    def describe(self) -> str:
        m = self.metadata
        return f"{self.name} v{self.version} ({m['cell']}, {m['num_layers']}x{m['hidden_size']})"


def load_model(models_dir: Path, name: str | None, version: int | None) -> Model:
    names = (
        sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
    )
    if not names:
        sys.exit(f"error: no models in {models_dir}")
    name = name or names[0]
    if name not in names:
        sys.exit(f"error: no model {name!r} in {models_dir}; found {', '.join(names)}")
    versions = sorted(int(p.name) for p in (models_dir / name).iterdir() if p.name.isdigit())
    version = version or versions[-1]
    metadata = json.loads((models_dir / name / str(version) / "metadata.json").read_text())
    return Model(models_dir, name, version, metadata)


def export_synthetic(spec: str, out: Path) -> Model:
    """Export a random-weight model ``cell:layers:hidden[:inputs]`` (needs the training extra)."""
    import torch

    from training.export import export_model
    from training.model import ModelConfig, RecurrentModel

    cell, layers, hidden, *rest = spec.split(":")
    inputs = int(rest[0]) if rest else 1
    torch.manual_seed(0)
    config = ModelConfig(cell, inputs, int(hidden), 1, num_layers=int(layers))
    name = f"bench-{cell}-{layers}x{hidden}"
    export_model(RecurrentModel(config), out / name / "1", name=name, version=1)
    return load_model(out, name, 1)


# ----------------------------------------------------------------------------- inputs & reference


def session_blocks(seed: int, input_size: int) -> Iterator[np.ndarray]:
    """The endless, reproducible inputs of one session, ``BLOCK`` rows (BLOCK, n) at a time: the
    one source of every mode's inputs and of the reference's."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.standard_normal((BLOCK, input_size), dtype=np.float32)


def session_inputs(seed: int, input_size: int) -> Iterator[np.ndarray]:
    """The input rows of one session, one at a time."""
    for block in session_blocks(seed, input_size):
        yield from block


def first_rows(seed: int, input_size: int, count: int) -> np.ndarray:
    """The first ``count`` rows ``session_inputs`` yields."""
    drawn = list(itertools.islice(session_blocks(seed, input_size), -(-count // BLOCK)))
    return np.concatenate(drawn or [np.zeros((0, input_size), np.float32)])[:count]


def reference_outputs(model: Model, seeds: list[int], counts: list[int]) -> list[np.ndarray]:
    """Each session's outputs, computed step by step from zero state with ONNX Runtime."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    runner = ort.InferenceSession(str(model.onnx_path), options, ["CPUExecutionProvider"])
    m = model.metadata
    state_shape = (m["num_layers"], len(seeds), m["hidden_size"])
    states = {name: np.zeros(state_shape, np.float32) for name in m["state_inputs"]}
    inputs = [first_rows(s, model.input_size, c) for s, c in zip(seeds, counts, strict=True)]
    outputs = [np.zeros((c, m["output_size"]), np.float32) for c in counts]
    output_names = [output.name for output in runner.get_outputs()]
    for t in range(max(counts, default=0)):
        active = np.array([i for i, c in enumerate(counts) if c > t])
        feeds = {name: state[:, active] for name, state in states.items()}
        feeds["x"] = np.stack([inputs[i][t] for i in active])[:, None, :]  # (B, 1, n)
        feeds["lengths"] = np.ones(len(active), np.int64)
        results = dict(zip(output_names, runner.run(None, feeds), strict=True))
        for name_in, name_out in zip(m["state_inputs"], m["state_outputs"], strict=True):
            states[name_in][:, active] = results[name_out]
        for j, i in enumerate(active):
            outputs[i][t] = results["y"][j, 0]
    return outputs


# ----------------------------------------------------------------------------- one session


@dataclass
class SessionRun:
    """What one session did: its outputs, step latencies and reply times, or its error."""

    seed: int
    outputs: list[list[float]] = field(default_factory=list)
    latencies: array[float] = field(default_factory=lambda: array("d"))  # seconds per step
    replied_at: array[float] = field(default_factory=lambda: array("d"))  # seconds since the start
    error: str | None = None


def frame(row: np.ndarray) -> str:
    return orjson.dumps({"inputs": [row.tolist()]}).decode()


def check_reply(reply: Any, expected_steps: int) -> list[float]:
    if "error" in reply:
        raise RuntimeError(f"error reply: {reply['error']}")
    if reply.get("step_count") != expected_steps:
        raise RuntimeError(f"step_count {reply.get('step_count')}, expected {expected_steps}")
    return [float(v) for v in reply["outputs"][0]]


async def run_ws_session(
    url: str,
    run: SessionRun,
    input_size: int,
    ready: asyncio.Event,
    clock: Clock,
) -> None:
    rows = session_inputs(run.seed, input_size)
    try:
        async with connect(url, compression=None, proxy=None, open_timeout=30) as ws:
            hello = orjson.loads(await ws.recv())
            if "session_id" not in hello:
                raise RuntimeError(f"no session announced: {hello}")
            ready.set()
            await clock.started.wait()
            while clock.running():
                sent = time.perf_counter()
                await ws.send(frame(next(rows)))
                reply = orjson.loads(await ws.recv())
                clock.record(run, sent, check_reply(reply, len(run.outputs) + 1))
            await ws.send(orjson.dumps({"close": True}).decode())  # deletes the session
    except Exception as exc:  # every failure is counted and reported, never fatal to the run
        run.error = f"{type(exc).__name__}: {exc}"
        ready.set()


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client: one request at a time, JSON bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = 0
        for line in headers.split("\r\n"):
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_http_session(
    port: int, model: str, run: SessionRun, input_size: int, ready: asyncio.Event, clock: Clock
) -> None:
    rows = session_inputs(run.seed, input_size)
    http = HttpConnection(HOST, port)
    try:
        await http.open()
        status, body = await http.request("POST", "/v1/sessions", orjson.dumps({"model": model}))
        if status != 201:
            raise RuntimeError(f"create session: HTTP {status} {body[:200]!r}")
        path = f"/v1/sessions/{orjson.loads(body)['session_id']}"
        ready.set()
        await clock.started.wait()
        while clock.running():
            sent = time.perf_counter()
            status, body = await http.request("POST", path + "/steps", frame(next(rows)).encode())
            if status != 200:
                raise RuntimeError(f"step: HTTP {status} {body[:200]!r}")
            clock.record(run, sent, check_reply(orjson.loads(body), len(run.outputs) + 1))
        await http.request("DELETE", path)
    except Exception as exc:  # every failure is counted and reported, never fatal to the run
        run.error = f"{type(exc).__name__}: {exc}"
        ready.set()
    finally:
        await http.close()


async def run_v2_session(
    port: int, model: str, run: SessionRun, input_size: int, ready: asyncio.Event, clock: Clock
) -> None:
    """A V2 sequence (Triton's sequence extension), one JSON infer request per step."""
    rows = session_inputs(run.seed, input_size)
    http = HttpConnection(HOST, port)
    path = f"/v2/models/{model}/infer"
    try:
        await http.open()
        ready.set()
        await clock.started.wait()
        while clock.running():
            first = not run.outputs
            body = v2_request(run.seed, next(rows), first)
            sent = time.perf_counter()
            status, reply = await http.request("POST", path, body)
            if status != 200:
                raise RuntimeError(f"infer: HTTP {status} {reply[:200]!r}")
            clock.record(run, sent, check_v2_reply(orjson.loads(reply), len(run.outputs) + 1))
        await http.request("POST", path, v2_request(run.seed, next(rows), False, end=True))
    except Exception as exc:  # every failure is counted and reported, never fatal to the run
        run.error = f"{type(exc).__name__}: {exc}"
        ready.set()
    finally:
        await http.close()


def v2_request(sequence_id: int, row: np.ndarray, start: bool, end: bool = False) -> bytes:
    parameters = {"sequence_id": sequence_id + 1, "sequence_start": start, "sequence_end": end}
    tensor = {"name": "x", "shape": [1, 1, len(row)], "datatype": "FP32", "data": row.tolist()}
    return orjson.dumps({"parameters": parameters, "inputs": [tensor], "outputs": [{"name": "y"}]})


def check_v2_reply(reply: Any, expected_steps: int) -> list[float]:
    if "error" in reply:
        raise RuntimeError(f"error reply: {reply['error']}")
    if reply["parameters"]["step_count"] != expected_steps:
        raise RuntimeError(
            f"step_count {reply['parameters']['step_count']}, expected {expected_steps}"
        )
    (y,) = (o for o in reply["outputs"] if o["name"] == "y")
    return [float(v) for v in y["data"]]


async def run_mux_group(
    url: str,
    model: str,
    runs: list[SessionRun],
    input_size: int,
    ready: asyncio.Event,
    clock: Clock,
) -> None:
    """K sessions on one /v1/mux connection: one binary frame steps all of them, closed loop."""
    from service.client.mux import MuxClient

    k = len(runs)
    blocks = [session_blocks(run.seed, input_size) for run in runs]
    frames: list[np.ndarray] = []  # (K, o) outputs per frame
    latencies, replied = array("d"), array("d")
    try:
        async with await MuxClient.connect(url) as mux:
            opened = await mux.open(model, k)
            handles = np.array(opened.handles, np.int32)
            ready.set()
            await clock.started.wait()
            block = np.zeros((k, 0, input_size), np.float32)
            while clock.running():
                t = len(frames) % BLOCK
                if t == 0:  # the next BLOCK rows of every session
                    block = np.stack([next(rows) for rows in blocks])
                sent = time.perf_counter()
                reply = await mux.step(handles, block[:, t : t + 1])
                now = time.perf_counter()
                if reply.messages or (reply.step_counts != len(frames) + 1).any():
                    raise RuntimeError(
                        f"frame {len(frames)}: {reply.messages or reply.step_counts}"
                    )
                frames.append(reply.outputs[:, 0].copy())
                latencies.append(now - sent)
                replied.append(now - clock.start)
            await mux.close(opened.handles)
    except Exception as exc:  # every failure is counted and reported, never fatal to the run
        for run in runs:
            run.error = f"{type(exc).__name__}: {exc}"
        ready.set()
    outputs = np.stack(frames, axis=1) if frames else np.zeros((k, 0, 1), np.float32)
    for i, run in enumerate(runs):
        run.outputs = outputs[i]  # (frames, o)
        run.latencies, run.replied_at = latencies, replied


class GrpcStream:
    """One ``ModelStreamInfer`` call shared by several sessions, each with one request in flight.

    Requests carry the session's seed as their id; the reader hands each response to the session
    waiting on that id.
    """

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"{HOST}:{port}")
        stub = pb_grpc.GRPCInferenceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.call = stub.ModelStreamInfer()
        self.waiting: dict[str, asyncio.Future[pb.ModelStreamInferResponse]] = {}
        self.write_lock = asyncio.Lock()  # one message in flight per call
        self.reader = asyncio.create_task(self._read())

    async def request(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        answer: asyncio.Future[pb.ModelStreamInferResponse]
        answer = asyncio.get_running_loop().create_future()
        self.waiting[request.id] = answer
        async with self.write_lock:
            await self.call.write(request)
        response = await answer
        if response.error_message:
            raise RuntimeError(f"error reply: {response.error_message}")
        return response.infer_response

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.waiting.pop(response.infer_response.id).set_result(response)
        except Exception as exc:  # the stream failed: every waiting session fails with it
            for answer in self.waiting.values():
                if not answer.done():
                    answer.set_exception(exc)

    async def close(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.call.done_writing()
        await self.reader
        await self.channel.close()


class GrpcStreams:
    """A drive's streams: session ``i`` uses stream ``i // per_stream``, opened on first use."""

    def __init__(self, port: int, per_stream: int) -> None:
        self.port, self.per_stream = port, per_stream
        self.streams: dict[int, GrpcStream] = {}

    def of(self, index: int) -> GrpcStream:
        key = index // self.per_stream
        if key not in self.streams:
            self.streams[key] = GrpcStream(self.port)
        return self.streams[key]

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.streams.values()))


def grpc_step(model: str, seed: int, row: np.ndarray, start: bool) -> pb.ModelInferRequest:
    """One step of the session's sequence (id: its seed + 1), asking for ``y`` only."""
    request = pb.ModelInferRequest(model_name=model, id=str(seed))
    request.inputs.add(name="x", datatype="FP32", shape=(1, 1, row.size))
    request.raw_input_contents.append(np.ascontiguousarray(row, "<f4").tobytes())
    request.outputs.add(name="y")
    request.parameters["sequence_id"].uint64_param = seed + 1
    if start:
        request.parameters["sequence_start"].bool_param = True
    return request


def check_grpc_reply(response: pb.ModelInferResponse, expected_steps: int) -> list[float]:
    step_count = response.parameters["step_count"].int64_param
    if step_count != expected_steps:
        raise RuntimeError(f"step_count {step_count}, expected {expected_steps}")
    return [float(v) for v in np.frombuffer(response.raw_output_contents[0], "<f4")]


async def run_grpc_session(
    stream: GrpcStream,
    model: str,
    run: SessionRun,
    input_size: int,
    ready: asyncio.Event,
    clock: Clock,
) -> None:
    """A sequence on a shared stream; after the window one more step ends the sequence."""
    rows = session_inputs(run.seed, input_size)
    try:
        await stream.channel.channel_ready()
        ready.set()
        await clock.started.wait()
        while True:
            running = clock.running()
            request = grpc_step(model, run.seed, next(rows), start=not run.outputs)
            request.parameters["sequence_end"].bool_param = not running
            sent = time.perf_counter()
            response = await stream.request(request)
            clock.record(run, sent, check_grpc_reply(response, len(run.outputs) + 1))
            if not running:
                return
    except Exception as exc:  # every failure is counted and reported, never fatal to the run
        run.error = f"{type(exc).__name__}: {exc}"
        ready.set()


class Clock:
    """The shared run window: sessions step while it runs and stamp every reply."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.start = 0.0
        self.deadline = float("inf")
        self.started = asyncio.Event()  # sessions wait on it once open

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + self.duration
        self.started.set()

    def running(self) -> bool:
        return time.perf_counter() < self.deadline

    def record(self, run: SessionRun, sent: float, outputs: list[float]) -> None:
        now = time.perf_counter()
        run.outputs.append(outputs)
        run.latencies.append(now - sent)
        run.replied_at.append(now - self.start)


# ----------------------------------------------------------------------------- drive many sessions


@dataclass(frozen=True)
class DriveSpec:
    mode: str  # "ws", "http", "v2" or "mux"
    port: int
    model: str
    input_size: int
    seeds: list[int]
    duration: float
    warmup: float  # seconds at the start that are not counted
    server_pid: int | None  # whose CPU time is sampled over the counted window, if known
    mux_connections: int = 1  # mux mode: the sessions are split over this many connections
    grpc_port: int = 0  # the service's gRPC port (mode grpc)
    per_stream: int = 16  # sessions sharing one gRPC stream (mode grpc)


@dataclass
class Drive:
    """The sessions' runs and the CPU use (in cores) of both sides over the counted window."""

    runs: list[SessionRun]
    generator_cpu: float = 0.0
    server_cpu: float = 0.0
    mean_batch: float = float("nan")  # chunks per ONNX Runtime call (service only)


def server_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sample_cpu(spec: DriveSpec, clock: Clock, drive: Drive) -> None:
    """Measure both processes' CPU time over [start + warmup, deadline]."""
    await asyncio.sleep(spec.warmup)
    pid = spec.server_pid
    generator, server = time.process_time(), server_cpu_seconds(pid) if pid else math.nan
    await asyncio.sleep(max(0.0, clock.deadline - time.perf_counter()))
    window = spec.duration - spec.warmup
    drive.generator_cpu = (time.process_time() - generator) / window
    drive.server_cpu = ((server_cpu_seconds(pid) if pid else math.nan) - server) / window


async def drive(spec: DriveSpec, barrier: Any = None) -> Drive:
    """Open every session, start them together, run for the duration, return what they did."""
    runs = [SessionRun(seed) for seed in spec.seeds]
    clock, all_open = Clock(spec.duration), asyncio.Event()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)  # bounds the connections being opened at once
    streams = GrpcStreams(spec.grpc_port, spec.per_stream) if spec.mode == "grpc" else None

    def session(unit: list[SessionRun], ready: asyncio.Event) -> Coroutine[Any, Any, None]:
        run, n = unit[0], spec.input_size
        if streams is not None:
            stream = streams.of(spec.seeds.index(run.seed))
            return run_grpc_session(stream, spec.model, run, n, ready, clock)
        if spec.mode == "ws":
            url = f"ws://{HOST}:{spec.port}/v1/stream?model={spec.model}"
            return run_ws_session(url, run, n, ready, clock)
        if spec.mode == "v2":
            return run_v2_session(spec.port, spec.model, run, n, ready, clock)
        if spec.mode == "mux":
            return run_mux_group(f"ws://{HOST}:{spec.port}", spec.model, unit, n, ready, clock)
        return run_http_session(spec.port, spec.model, run, n, ready, clock)

    units = [[run] for run in runs]
    if spec.mode == "mux":  # each connection carries a share of the sessions
        units = [runs[i :: spec.mux_connections] for i in range(spec.mux_connections)]
    opening = len(units)

    async def open_and_run(unit: list[SessionRun]) -> None:
        nonlocal opening
        ready = asyncio.Event()
        async with gate:
            task = asyncio.create_task(session(unit, ready))
            await ready.wait()
        opening -= 1
        if opening == 0:
            all_open.set()
        await task

    tasks = [asyncio.create_task(open_and_run(unit)) for unit in units]
    await all_open.wait()
    if barrier is not None:  # several processes start together
        await asyncio.to_thread(barrier.wait)
    clock.begin()
    result = Drive(runs)
    await asyncio.gather(sample_cpu(spec, clock, result), *tasks)
    if streams is not None:
        await streams.close()
    return result


def _drive_in_process(spec: DriveSpec, barrier: Any, results: Any) -> None:
    _use_uvloop()
    results.put(asyncio.run(drive(spec, barrier)))


def drive_all(spec: DriveSpec, processes: int) -> Drive:
    """Drive the sessions from one process, or split across several (forked) processes."""
    if processes <= 1:
        return asyncio.run(drive(spec))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    parts = [spec.seeds[i::processes] for i in range(processes)]
    workers = [
        ctx.Process(target=_drive_in_process, args=(_with_seeds(spec, p), barrier, results))
        for p in parts
    ]
    for worker in workers:
        worker.start()
    drives = [results.get(timeout=spec.duration + 300) for _ in workers]
    for worker in workers:
        worker.join()
    runs = sorted((run for d in drives for run in d.runs), key=lambda run: run.seed)
    generator_cpu = sum(d.generator_cpu for d in drives)
    return Drive(runs, generator_cpu, max(d.server_cpu for d in drives))


def _with_seeds(spec: DriveSpec, seeds: list[int]) -> DriveSpec:
    return dataclasses.replace(spec, seeds=seeds)


def _use_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server on 127.0.0.1: started here (with its process and log) or already running."""

    process: subprocess.Popen[bytes] | None
    port: int
    log: Path | None
    grpc_port: int = 0  # 0: no gRPC

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (no psutil needed)."""
        assert self.process is not None, "only a server started here can be measured"
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")


@contextmanager
def start_server(
    command: list[str], env: dict[str, str], port: int, root: Path = ROOT, grpc_port: int = 0
) -> Iterator[Server]:
    """Start a server subprocess in ``root`` (a checkout), wait until /health/ready answers, stop
    it on exit."""
    with tempfile.NamedTemporaryFile(prefix="loadgen-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            command, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT, cwd=root
        )
    log_path = Path(log.name)
    server = Server(process, port, log_path, grpc_port)
    try:
        _wait_ready(server, process, log_path)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_path.unlink(missing_ok=True)


def _wait_ready(
    server: Server, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"error: server exited early:\n{log.read_text()[-3000:]}")
        try:
            server.get_json("/health/ready")
            return
        except (OSError, ValueError):
            time.sleep(0.2)
    sys.exit(f"error: server not ready after {timeout:g} s:\n{log.read_text()[-3000:]}")


def service_command(model: Model, port: int, grpc_port: int | None = 0) -> list[str]:
    """``python -m service`` on ``port``; gRPC on ``grpc_port`` (0: off, so 8001 is never taken;
    None: no such flag, for a baseline older than gRPC)."""
    command = [sys.executable, "-m", "service", "--host", HOST, "--port", str(port)]
    if grpc_port is not None:
        command += ["--grpc-port", str(grpc_port)]
    return [*command, "--models-dir", str(model.models_dir)]


def service_env(batching: bool, gpu: bool, max_sessions: int) -> dict[str, str]:
    providers = "CUDAExecutionProvider,CPUExecutionProvider" if gpu else "CPUExecutionProvider"
    env = {
        "RNNSERVE_PROVIDERS": providers,
        "RNNSERVE_LOG_LEVEL": "warning",
        "RNNSERVE_MAX_SESSIONS": str(max_sessions),
        "RNNSERVE_IDLE_TTL_S": "0",
    }
    if not batching:
        env["RNNSERVE_MAX_BATCH_SIZE"] = "1"
    return env


def walk_items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a decoded JSON document, depth first."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from walk_items(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk_items(item)


def provider_in_use(server: Server) -> str:
    """The execution provider the service reports for its models."""
    found = {item for key, item in walk_items(server.get_json("/v1/models")) if key == "provider"}
    return ", ".join(sorted(map(str, found))) or "unknown"


def batch_counters(server: Server) -> tuple[int, int]:
    """Batches run and chunks batched so far, summed over the service's batchers."""
    pairs = list(walk_items(server.get_json("/v1/stats")))
    batches = sum(item for key, item in pairs if key == "batches" and isinstance(item, int))
    chunks = sum(item for key, item in pairs if key == "chunks" and isinstance(item, int))
    return batches, chunks


# ----------------------------------------------------------------------------- measuring


@dataclass
class Row:
    target: str
    mode: str
    sessions: int
    steps_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mismatches: int
    steps: int  # all steps checked, warm-up and tail included
    generator_cpu: float  # cores used by the load generator
    server_cpu: float  # cores used by the server process
    mean_batch: float  # chunks per ONNX Runtime call over the run

    @property
    def server_us_per_step(self) -> float:
        """The server's CPU time per answered step, in microseconds."""
        if not self.steps_per_s:
            return math.nan
        return self.server_cpu / self.steps_per_s * 1e6


def summarise(target: str, spec: DriveSpec, drive: Drive, mismatches: int) -> Row:
    """Throughput and latency over the counted window, [warmup, duration)."""
    latencies, replied = [], []
    for run in drive.runs:
        at = np.frombuffer(run.replied_at)
        counted = (at >= spec.warmup) & (at < spec.duration)
        latencies.append(np.frombuffer(run.latencies)[counted])
        replied.append(at[counted])
    latency = np.concatenate(latencies) * 1e3
    p50, p99 = np.percentile(latency, [50, 99]) if latency.size else (np.nan, np.nan)
    return Row(
        target=target,
        mode=spec.mode,
        sessions=len(drive.runs),
        steps_per_s=latency.size / (spec.duration - spec.warmup),
        p50_ms=float(p50),
        p99_ms=float(p99),
        errors=sum(1 for run in drive.runs if run.error),
        mismatches=mismatches,
        steps=sum(len(run.outputs) for run in drive.runs),
        generator_cpu=drive.generator_cpu,
        server_cpu=drive.server_cpu,
        mean_batch=drive.mean_batch,
    )


def count_mismatches(
    target: str, model: Model, runs: list[SessionRun], rtol: float, atol: float
) -> int:
    """Steps whose output differs from the sequential reference (echo: from the input)."""
    counts = [len(r.outputs) for r in runs]
    seeds = [r.seed for r in runs]
    if target == "echo":
        expected = [first_rows(s, model.input_size, c) for s, c in zip(seeds, counts, strict=True)]
    else:
        expected = reference_outputs(model, seeds, counts)
    bad = 0
    for run, want in zip(runs, expected, strict=True):
        got = np.array(run.outputs, dtype=np.float64).reshape(want.shape)
        bad += int(np.count_nonzero(~np.isclose(got, want, rtol=rtol, atol=atol).all(axis=1)))
    return bad


def measure(target: str, server: Server, model: Model, args: argparse.Namespace) -> list[Row]:
    rows = []
    for mode in args.modes:
        if target == "echo" and mode not in ECHO_MODES:
            continue
        if mode == "grpc" and not server.grpc_port:
            print(f"{target:<8}{mode:<6} skipped: no gRPC port given (--grpc-port)", flush=True)
            continue
        for sessions in args.sessions:
            seeds = list(range(1000 * sessions, 1000 * sessions + sessions))
            spec = DriveSpec(
                mode=mode,
                port=server.port,
                model=model.name,
                input_size=model.input_size,
                seeds=seeds,
                duration=args.duration,
                warmup=args.warmup,
                server_pid=server.process.pid if server.process else None,
                mux_connections=args.mux_connections,
                grpc_port=server.grpc_port,
                per_stream=args.grpc_sessions_per_stream,
            )
            before = batch_counters(server) if target != "echo" else (0, 0)
            drive = drive_all(spec, args.processes)
            if target != "echo":
                batches, chunks = np.subtract(batch_counters(server), before)
                drive.mean_batch = chunks / batches if batches else 0.0
            mismatches = count_mismatches(target, model, drive.runs, args.rtol, args.atol)
            row = summarise(target, spec, drive, mismatches)
            rows.append(row)
            print(format_row(row), flush=True)
            for run in [r for r in drive.runs if r.error][:3]:
                print(f"    session {run.seed}: {run.error}", flush=True)
            if mode == "mux":
                print(bare_call_line(model, sessions // args.mux_connections), flush=True)
    return rows


def bare_call_line(model: Model, batch: int) -> str:
    """One step of ``batch`` sessions as a single ONNX Runtime call, as the service configures
    its sessions: the physical limit of a mux frame on this machine."""
    options = session_options(0, on_cpu=True)
    runner = ort.InferenceSession(str(model.onnx_path), options, ["CPUExecutionProvider"])
    m = model.metadata
    feeds = {
        name: np.zeros((m["num_layers"], batch, m["hidden_size"]), np.float32)
        for name in m["state_inputs"]
    }
    feeds["x"] = np.random.default_rng(0).standard_normal((batch, 1, model.input_size), np.float32)
    feeds["lengths"] = np.ones(batch, np.int64)
    seconds = timing.median_seconds(lambda: runner.run(None, feeds), 1.0, 200)
    return (
        f"    bare ONNX Runtime call, batch {batch} (1 thread): {seconds * 1e3:.2f} ms, "
        f"{batch / seconds:,.0f} session-steps/s"
    )


def measure_memory(server: Server, model: Model, count: int) -> str:
    """Open ``count`` sessions over HTTP, step each once, and report the server's RSS growth.

    Each session takes one step so that its state is really written: fresh zero pages cost no
    resident memory until touched, and never-stepped sessions would understate the cost.
    """
    asyncio.run(_open_idle_sessions(server.port, model, 1))
    time.sleep(0.5)
    before = server.rss_bytes()
    started = time.perf_counter()
    asyncio.run(_open_idle_sessions(server.port, model, count))
    elapsed = time.perf_counter() - started
    time.sleep(0.5)
    after = server.rss_bytes()
    grown = after - before
    m = model.metadata
    raw = count * m["num_layers"] * m["hidden_size"] * 4 * len(m["state_inputs"])
    pool = sum(v for k, v in walk_items(server.get_json("/v1/stats")) if k == "pool_bytes")
    return (
        f"memory: {count:,} idle sessions (one step each) of {model.describe()}: RSS "
        f"{before / 1e6:.0f} -> {after / 1e6:.0f} MB, +{grown / 1e6:.0f} MB "
        f"({grown / count:,.0f} B/session; raw state {raw / 1e6:.0f} MB, state pool "
        f"{pool / 1e6:.0f} MB allocated); opened in {elapsed:.1f} s ({count / elapsed:,.0f}/s)"
    )


async def _open_idle_sessions(port: int, model: Model, count: int, connections: int = 32) -> None:
    create = orjson.dumps({"model": model.name})
    step = orjson.dumps({"inputs": [[0.5] * model.input_size]})
    remaining = iter(range(count))

    async def worker() -> None:
        http = HttpConnection(HOST, port)
        await http.open()
        try:
            for _ in remaining:
                status, reply = await http.request("POST", "/v1/sessions", create)
                if status != 201:
                    raise RuntimeError(f"create session: HTTP {status} {reply[:200]!r}")
                path = f"/v1/sessions/{orjson.loads(reply)['session_id']}/steps"
                status, reply = await http.request("POST", path, step)
                if status != 200:
                    raise RuntimeError(f"step: HTTP {status} {reply[:200]!r}")
        finally:
            await http.close()

    await asyncio.gather(*(worker() for _ in range(min(connections, count))))


# ----------------------------------------------------------------------------- report


HEADER = (
    f"{'target':<8}{'mode':<6}{'sessions':>9}{'steps/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
    f"{'errors':>8}{'mismatch':>10}{'checked':>13}{'gen cpu':>9}{'srv cpu':>9}{'us/step':>9}"
    f"{'batch':>7}"
)


def format_row(row: Row) -> str:
    return (
        f"{row.target:<8}{row.mode:<6}{row.sessions:>9}{row.steps_per_s:>11,.0f}"
        f"{row.p50_ms:>9.2f}{row.p99_ms:>9.2f}{row.errors:>8}{row.mismatches:>10}{row.steps:>13,}"
        f"{row.generator_cpu:>9.2f}{_number(row.server_cpu, 9, 2)}"
        f"{_number(row.server_us_per_step, 9, 1)}{_number(row.mean_batch, 7, 1)}"
    )


def _number(value: float, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{decimals}f}"


def _median(rows: list[Row], key: tuple[str, str, int], value: Callable[[Row], float]) -> float:
    """The median of ``value`` over the rows of one (target, mode, sessions), NaN if none."""
    same = [value(r) for r in rows if (r.target, r.mode, r.sessions) == key]
    return float(np.median(same)) if same else math.nan


def ratios(rows: list[Row]) -> list[str]:
    """Throughput against batching off and echo; server CPU per step against the baseline.

    With several rounds, each ratio is taken between the medians of the rounds.
    """
    lines = []
    for mode, sessions in sorted({(r.mode, r.sessions) for r in rows}):
        on = _median(rows, ("on", mode, sessions), lambda r: r.steps_per_s)
        for other, label in (("off", "batching on/off"), ("echo", "service/echo")):
            value = _median(rows, (other, mode, sessions), lambda r: r.steps_per_s)
            if on and not math.isnan(value):
                lines.append(f"{label:<16} {mode:<5}{sessions:>6} sessions: {on / value:.2f}x")
        base = _median(rows, ("base", mode, sessions), lambda r: r.server_us_per_step)
        if not math.isnan(base):
            now = _median(rows, ("on", mode, sessions), lambda r: r.server_us_per_step)
            lines.append(
                f"{'cpu/step on/base':<16} {mode:<5}{sessions:>6} sessions: {now:.1f} / "
                f"{base:.1f} us = {now / base:.2f}x"
            )
    return lines


def machine_line() -> str:
    return (
        f"machine: {timing.cpu_model()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}; load generator on the same machine; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--models-dir", type=Path, help="serve this models folder")
    source.add_argument(
        "--synthetic", default=None, help="export a random model CELL:LAYERS:HIDDEN[:INPUTS]"
    )
    parser.add_argument("--model", help="model name in --models-dir (default: the first)")
    parser.add_argument("--version", type=int, help="model version (default: the highest)")
    parser.add_argument("--sessions", default="256,1024", help="comma-separated session counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument(
        "--modes",
        default="ws,http",
        help="comma-separated: ws (/v1/stream), http (POST .../steps), v2 (V2 JSON sequence "
        "infer), mux (/v1/mux binary frames, all sessions of a row in --mux-connections "
        "connections)",
    )
    parser.add_argument(
        "--mux-connections", type=int, default=1, help="mux mode: connections sharing the sessions"
    )
    parser.add_argument(
        "--targets",
        default="on,off,echo",
        help="on, off, echo, base (the service of --baseline) or none",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git worktree add /tmp/base REV`) served as target 'base'",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the targets this many times")
    parser.add_argument(
        "--grpc-sessions-per-stream",
        type=int,
        default=16,
        help="sessions sharing one gRPC stream (mode grpc; one stream per 16 sessions by default)",
    )
    parser.add_argument(
        "--grpc-port", type=int, default=8001, help="gRPC port of the service given by --port"
    )
    parser.add_argument(
        "--port", type=int, help="measure a service already running on 127.0.0.1:PORT instead"
    )
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--memory", type=int, default=0, help="also measure K idle sessions")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the service (repeatable), e.g. RNNSERVE_INTRA_OP_THREADS=1",
    )
    parser.add_argument("--gpu", action="store_true", help="serve with the CUDA provider first")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance")
    parser.add_argument("--quick", action="store_true", help="64 sessions, 3 s, ws only")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.duration, args.warmup, args.modes = "64", 3.0, 0.5, "ws"
    args.sessions = [int(n) for n in args.sessions.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.targets = [t for t in args.targets.split(",") if t and t != "none"]
    if not 0 <= args.warmup < args.duration:
        parser.error("--warmup must be >= 0 and shorter than --duration")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.port and args.models_dir is None:
        parser.error("--port needs --models-dir: the reference runs on the served model files")
    if set(args.modes) - set(MODES) or set(args.targets) - {"on", "off", "echo", "base"}:
        parser.error(f"--modes takes {','.join(MODES)}; --targets takes on,off,echo,base or none")
    if ("base" in args.targets) != (args.baseline is not None):
        parser.error("target 'base' and --baseline go together")
    if args.grpc_sessions_per_stream < 1:
        parser.error("--grpc-sessions-per-stream must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _use_uvloop()
    with tempfile.TemporaryDirectory(prefix="loadgen-models-") as scratch:
        if args.models_dir is not None:
            model = load_model(args.models_dir, args.model, args.version)
        else:
            model = export_synthetic(args.synthetic or "gru:1:48", Path(scratch))
        run_all(model, args)


def run_all(model: Model, args: argparse.Namespace) -> None:
    print(machine_line())
    print(
        f"model: {model.describe()}; {args.duration:g} s per row ({args.warmup:g} s warm-up not "
        f"counted); closed loop, one step per frame; {args.processes} load generator process(es)"
    )
    if args.server_env:
        print("service settings: " + " ".join(f"{k}={v}" for k, v in args.server_env.items()))
    if args.port:
        server = Server(None, args.port, None, args.grpc_port)
        print(f"live: service on port {args.port}, provider in use {provider_in_use(server)}")
        print(HEADER, flush=True)
        rows = measure("live", server, model, args)
        return
    max_sessions = len(args.modes) * sum(args.sessions) + args.memory + 1000
    rows = []
    for target in args.targets * args.rounds:  # rounds interleave the targets: A B A B
        port, grpc_port = free_port(), free_port() if "grpc" in args.modes else 0
        root = ROOT
        if target == "echo":
            command, env = [sys.executable, str(ECHO_SERVER), "--port", str(port)], {}
            command += ["--grpc-port", str(grpc_port)]
        else:
            command = service_command(model, port, None if target == "base" else grpc_port)
            env = service_env(target != "off", args.gpu, max_sessions) | args.server_env
            if target == "base":  # the same service from another checkout, e.g. an older commit
                root, env = args.baseline, env | {"PYTHONPATH": str(args.baseline)}
        served_grpc = 0 if target == "base" else grpc_port
        with start_server(command, env, port, root, served_grpc) as server:
            if target != "echo":
                print(f"{target}: provider in use {provider_in_use(server)}", flush=True)
            if not rows:
                print(HEADER, flush=True)
            rows += measure(target, server, model, args)
    if rows:
        print("\n" + HEADER)
        print("\n".join(format_row(row) for row in rows))
        for line in ratios(rows):
            print(line)
    if args.memory:
        port = free_port()
        env = service_env(True, args.gpu, max_sessions) | args.server_env
        with start_server(service_command(model, port), env, port) as server:
            print(measure_memory(server, model, args.memory))


if __name__ == "__main__":
    main()
