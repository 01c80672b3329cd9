"""Batched session steps with the state pool on the device, against the host (numpy) pool.

    python bench/gpu_bench.py --model bench/models/mgu-2x256/1 --model models/co2-forecaster/1
    python bench/gpu_bench.py --provider cpu --batches 1,16,256 --budget-s 0.2   # a dry run

One call = one step of B sessions (chunks of one time step, every session in a different slot).
``device`` runs ``DevicePool.step``: the states are gathered, advanced and scattered on the device
in one ONNX Runtime call through IOBinding; only x goes in and y comes out. ``host`` runs what the
service does with the numpy ``StatePool``: gather on the host, ``InferenceSession.run`` with numpy
feeds, scatter on the host. ``copy`` rows run the device pool with double buffering
(``in_place=False``), which copies the whole pool every call: their difference with ``device`` at
the same pool size is the price of that copy. ``graph`` rows run single steps on the pool's
fixed-shape bucket graphs, which on CUDA are replayed as CUDA graphs (the service's default
there, ``--cuda-graphs``). The footer checks parity against the CPU provider (CUDA with
``use_tf32=0``) over a few steps: outputs and the states left in the pool.

Needs numpy, onnx and onnxruntime(-gpu) only: no torch, no fastapi, no pydantic.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.engine.device_pool import DevicePool, StateLayout
from service.engine.state_pool import StatePool

Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass(frozen=True)
class Model:
    name: str
    onnx_path: Path
    layout: StateLayout
    input_size: int

    @classmethod
    def read(cls, folder: Path) -> Model:
        meta = json.loads((folder / "metadata.json").read_text())
        layout = StateLayout(
            tuple(meta["state_inputs"]),
            tuple(meta["state_outputs"]),
            meta["num_layers"],
            meta["hidden_size"],
        )
        label = f"{meta['name']} ({meta['cell']} {meta['num_layers']}x{meta['hidden_size']})"
        return cls(label, folder / "model.onnx", layout, meta["input_size"])


@dataclass(frozen=True)
class Row:
    model: str
    path: str
    batch: int
    pool_slots: int
    calls: int
    p50_ms: float
    p99_ms: float
    steps_per_s: float


class HostPath:
    """The service's host path: numpy pool, numpy feeds, numpy outputs."""

    def __init__(self, model: Model, provider: str, slots: int) -> None:
        self.model = model
        self.session = ort.InferenceSession(str(model.onnx_path), providers=_providers(provider))
        if self.session.get_providers()[0] != PROVIDERS[provider]:
            raise SystemExit(f"host path runs on {self.session.get_providers()[0]}, not {provider}")
        lay = model.layout
        self.pool = StatePool(lay.num_states, lay.num_layers, lay.hidden_size, slots, slots)
        for _ in range(slots):
            self.pool.acquire()

    def step(self, x: np.ndarray, lengths: np.ndarray, slots: np.ndarray) -> np.ndarray:
        states = self.pool.gather(slots)  # (S, L, B, m)
        feeds = {"x": x, "lengths": lengths}
        feeds.update(zip(self.model.layout.state_inputs, states, strict=True))
        y, *new = self.session.run(["y", *self.model.layout.state_outputs], feeds)
        self.pool.scatter(slots, np.stack(new))
        return np.asarray(y)


def _providers(provider: str, tf32: bool = True) -> list[str | tuple[str, dict[str, str]]]:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]


def device_pool(
    model: Model,
    provider: str,
    slots: int,
    *,
    in_place: bool = True,
    tf32: bool = True,
    buckets: tuple[int, ...] = (),
) -> DevicePool:
    options = {"use_tf32": "1" if tf32 else "0"} if provider == "cuda" else None
    pool = DevicePool(
        model.onnx_path,
        model.layout,
        max_slots=slots,
        initial_capacity=slots,
        device=provider,
        in_place=in_place,
        provider_options=options,
        buckets=buckets,
    )
    if buckets and pool.buckets != buckets:
        raise SystemExit(f"bucket graphs could not be built for {model.name} (see the log)")
    for _ in range(slots):
        pool.acquire()
    return pool


def time_calls(run: Step, model: Model, batch: int, pool_slots: int, budget_s: float) -> Row:
    """Time calls of ``run(x, lengths, slots)`` on fresh random inputs for about ``budget_s``."""
    rng = np.random.default_rng(batch)
    inputs = [rng.standard_normal((batch, 1, model.input_size), np.float32) for _ in range(4)]
    lengths = np.ones(batch, np.int64)
    slots = np.sort(rng.choice(pool_slots, batch, replace=False)).astype(np.intp)
    for x in inputs[:3]:
        run(x, lengths, slots)  # warm-up: kernels, arenas, first-call allocations
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < budget_s or len(times) < 5:
        t0 = time.perf_counter()
        run(inputs[len(times) % 4], lengths, slots)  # returns y on the host: synchronised
        times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    ms = np.array(times) * 1e3
    return Row(
        model.name,
        "",
        batch,
        pool_slots,
        len(times),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        batch * len(times) / float(np.sum(times)),
    )


def device_step(pool: DevicePool) -> Step:
    return lambda x, lengths, slots: pool.step(x, lengths, slots).y


def parity(model: Model, provider: str, steps: int = 4, batch: int = 64) -> tuple[float, float]:
    """Max |device - CPU| over ``steps`` steps of ``batch`` sessions: outputs, then final states."""
    pool = device_pool(model, provider, 2 * batch, tf32=False)
    reference = HostPath(model, "cpu", 2 * batch)
    rng = np.random.default_rng(7)
    slots = np.sort(rng.choice(2 * batch, batch, replace=False)).astype(np.intp)
    worst_y = 0.0
    for _ in range(steps):
        x = rng.standard_normal((batch, 3, model.input_size), np.float32)
        lengths = rng.integers(1, 4, batch).astype(np.int64)
        out = pool.step(x, lengths, slots)
        expected = reference.step(x, lengths, slots)
        worst_y = max(worst_y, float(np.abs(out.y - expected).max()))
        lazily = out.states()
        np.testing.assert_array_equal(lazily, pool.gather(slots))
    worst_state = float(np.abs(pool.gather(slots) - reference.pool.gather(slots)).max())
    return worst_y, worst_state


def machine(provider: str) -> str:
    if provider == "cpu":
        return f"{platform.processor() or platform.machine()}, CPU provider"
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True)
        return gpu.stdout.strip().replace("\n", "; ")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"GPU unknown ({exc})"


def bench_model(model: Model, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    slots = max(args.batches)
    pool = device_pool(model, args.provider, slots)
    rows += [
        _named(time_calls(device_step(pool), model, b, slots, args.budget_s), "device")
        for b in args.batches
    ]
    del pool
    if args.graph_batches:
        pool = device_pool(model, args.provider, slots, buckets=tuple(args.graph_batches))
        rows += [
            _named(time_calls(device_step(pool), model, b, slots, args.budget_s), "graph")
            for b in args.graph_batches
        ]
        del pool
    host = HostPath(model, args.provider, slots)
    rows += [
        _named(time_calls(host.step, model, b, slots, args.budget_s), "host")
        for b in args.host_batches
    ]
    del host
    for copy_slots in args.copy_slots:
        for in_place in (True, False):
            pool = device_pool(model, args.provider, copy_slots, in_place=in_place)
            row = time_calls(device_step(pool), model, args.copy_batch, copy_slots, args.budget_s)
            rows.append(_named(row, "device" if in_place else "copy"))
            del pool
    return rows


def _named(row: Row, path: str) -> Row:
    return Row(row.model, path, *list(row.__dict__.values())[2:])


def table(rows: list[Row]) -> str:
    head = f"{'model':<34} {'path':<7} {'batch':>6} {'pool':>8} {'calls':>6} "
    head += f"{'p50 ms':>9} {'p99 ms':>9} {'steps/s':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.model:<34} {r.path:<7} {r.batch:>6} {r.pool_slots:>8} {r.calls:>6} "
            f"{r.p50_ms:>9.3f} {r.p99_ms:>9.3f} {r.steps_per_s:>13,.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.provider == "cuda":
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            raise SystemExit(f"CUDAExecutionProvider missing: {ort.get_available_providers()}")
    models = [Model.read(Path(folder)) for folder in args.model]
    rows: list[Row] = []
    footer = []
    for model in models:
        check = device_pool(model, args.provider, 1)
        provider = check.provider
        if provider != PROVIDERS[args.provider]:
            raise SystemExit(f"device pool runs on {provider}, not {PROVIDERS[args.provider]}")
        rows += bench_model(model, args)
        try:
            y_diff, state_diff = parity(model, args.provider)
            footer.append(
                f"parity {model.name} vs CPU provider (use_tf32=0, 4 steps of 64 sessions, "
                f"ragged lengths): max |dy| {y_diff:.2e}, max |dstate| {state_diff:.2e}"
            )
        except Exception as exc:  # report and go on: the timings above still stand
            footer.append(f"parity {model.name}: FAILED: {type(exc).__name__}: {exc}")
        shown = len(args.batches) + len(args.graph_batches) + len(args.host_batches)
        print(table(rows[-shown - 2 * len(args.copy_slots) :]))
    text = "\n".join(
        [
            f"machine: {machine(args.provider)}; onnxruntime {ort.__version__}; provider in use: "
            f"{PROVIDERS[args.provider]}; python {platform.python_version()}",
            "one call = one time step for B sessions; latency per call (wall clock, y on host)",
            table(rows),
            *footer,
        ]
    )
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model version folder")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--batches", type=_ints, default=_ints("1,16,256,1024,4096,16384,65536"))
    parser.add_argument("--host-batches", type=_ints, default=_ints("1,256,4096,65536"))
    parser.add_argument(
        "--graph-batches",
        type=_ints,
        default=_ints("1,8,64,512,4096"),
        help="bucket sizes for the fixed-shape (CUDA graph) rows; empty for none",
    )
    parser.add_argument(
        "--copy-slots",
        type=_ints,
        default=_ints("65536,1048576"),
        help="pool sizes at which in-place and double-buffered pools are compared",
    )
    parser.add_argument("--copy-batch", type=int, default=256)
    parser.add_argument("--budget-s", type=float, default=1.0, help="seconds timed per row")
    parser.add_argument("--out", help="also write the table to this file")
    return parser.parse_args()


if __name__ == "__main__":
    main()
