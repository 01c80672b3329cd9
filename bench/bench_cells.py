"""Latency of every cell: the exported graph in ONNX Runtime (CPU) against torch eager.

    python bench/bench_cells.py            # full run, a few minutes on 2 cores
    python bench/bench_cells.py --quick    # seconds-long smoke run

For each cell, one layer, input 8, hidden 128 and 512: one step at batch 1, 64 and 1,024, and a
sequence of 256 steps at batch 32. Columns: median latency of torch eager (``RecurrentModel`` under
``no_grad``), of the ``scan`` graph, and for ``gru``/``lstm`` of the ``native`` graph, with ratios.
The table feeds ``training.export.AUTO_GRAPH``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import onnxruntime as ort
import torch

from training import timing
from training.cells import CELLS
from training.model import ModelConfig, RecurrentModel
from training.onnx_graph import NATIVE_CELLS, build_model_proto, state_names

INPUT_SIZE = 8


@dataclass(frozen=True)
class Shape:
    batch: int
    steps: int

    @property
    def label(self) -> str:
        return f"B={self.batch} T={self.steps}"


@dataclass(frozen=True)
class Plan:
    hidden_sizes: tuple[int, ...]
    shapes: tuple[Shape, ...]
    min_time_s: float  # keep repeating until this much time has passed ...
    max_repeats: int  # ... or this many runs; at least 3


FULL = Plan((128, 512), (Shape(1, 1), Shape(64, 1), Shape(1024, 1), Shape(32, 256)), 0.25, 300)
QUICK = Plan((32,), (Shape(1, 1), Shape(64, 1), Shape(8, 32)), 0.02, 50)


def median_seconds(fn: Callable[[], object], plan: Plan) -> float:
    return timing.median_seconds(fn, plan.min_time_s, plan.max_repeats)


def make_session(model: RecurrentModel, form: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    payload = build_model_proto(model, form).SerializeToString()
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def bench_shape(
    model: RecurrentModel, sessions: dict[str, ort.InferenceSession], shape: Shape, plan: Plan
) -> dict[str, float]:
    c = model.config
    x = torch.randn(shape.batch, shape.steps, c.input_size)
    lengths = torch.full((shape.batch,), shape.steps, dtype=torch.int64)
    state = model.initial_state(shape.batch)
    feed = {"x": x.numpy(), "lengths": lengths.numpy()}
    feed |= {n: s.numpy() for n, s in zip(state_names(c.num_states)[0], state, strict=True)}

    def run_torch() -> object:
        with torch.no_grad():
            return model(x, lengths, state)

    results = {"torch": median_seconds(run_torch, plan)}
    for form, session in sessions.items():
        results[form] = median_seconds(partial(session.run, None, feed), plan)
    return results


def machine_line(threads: int) -> str:
    return (
        f"{timing.cpu_model()}, {os.cpu_count()} cores, {threads} threads; "
        f"onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider), torch {torch.__version__}"
    )


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line(args.threads))
    header = [
        "cell",
        "hidden",
        "shape",
        "torch",
        "ort scan",
        "torch/scan",
        "ort native",
        "native/scan",
    ]
    rows: list[list[str]] = []
    for cell in args.cells:
        for hidden in plan.hidden_sizes:
            config = ModelConfig(
                cell=cell, input_size=INPUT_SIZE, hidden_size=hidden, output_size=1
            )
            model = RecurrentModel(config).eval()
            forms = ["scan", "native"] if cell in NATIVE_CELLS else ["scan"]
            sessions = {form: make_session(model, form, args.threads) for form in forms}
            for shape in plan.shapes:
                r = bench_shape(model, sessions, shape, plan)
                native = r.get("native")
                rows.append([
                    cell, str(hidden), shape.label, fmt_time(r["torch"]), fmt_time(r["scan"]),
                    f"{r['torch'] / r['scan']:.2f}x",
                    fmt_time(native) if native else "-",
                    f"{native / r['scan']:.2f}x" if native else "-",
                ])  # fmt: skip
                print("  ".join(rows[-1]), flush=True)
    print()
    print_table(header, rows)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
