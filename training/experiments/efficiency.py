"""Study ``efficiency``: parameters, training time and inference latency of every cell, alike.

Two comparisons: every cell at the same hidden size, and every cell at the hidden size that gives it
(about) the parameter budget of the LSTM at that size (:mod:`training.experiments.budget`).

What is timed, and in which form (each named in the report):

- training: one epoch of the adding problem (forward, backward, Adam) with the project's cells, the
  Python time loop that ``train`` uses (no cuDNN, no fused kernel), and for the GRU and the LSTM
  also torch's own ``nn.GRU`` / ``nn.LSTM`` with the same sizes, data and optimiser. On the CPU
  those run torch's native kernels; the study profiles one call and names the ATen operators
  (``aten::lstm`` calls oneDNN's ``mkldnn_rnn_layer``; ``aten::gru`` loops in C++);
- inference in ONNX Runtime: every cell as the ``scan`` graph that ``export`` writes, and the GRU
  and LSTM also as ONNX's native ``GRU``/``LSTM`` ops; one step at batch 1 (streaming) and one
  sequence of ``seq_batch`` x ``seq_steps``, the same shapes for every form;
- torch eager: one step at batch 1 of ``RecurrentModel`` (for reference: mostly Python overhead).

On a shared machine the load changes while the study runs, so every quantity is measured once per
round for every configuration in turn (A, B, C, ..., A, B, C, ...), and the tables show the median
over rounds. Ratios (GRU / LSTM in the same form) are taken within a round, then the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from training import timing
from training.cells import CELLS
from training.experiments.budget import matched_sizes
from training.experiments.options import StudyOptions
from training.experiments.plots import BarPanel, bar_figure
from training.experiments.report import Report, Table, check_finite
from training.model import ModelConfig, RecurrentModel
from training.onnx_graph import NATIVE_CELLS, build_model_proto, state_names
from training.tasks import SequenceSplit
from training.tasks.adding import adding_split
from training.train import TrainConfig, train_epoch

INPUT_SIZE = 8  # features per step for every model in this study
REFERENCE_CELL = "lstm"  # the parameter budget is this cell's count at the plan's hidden size
FUSED = {"gru": nn.GRU, "lstm": nn.LSTM}


@dataclass(frozen=True)
class Plan:
    """The sizes of one configuration of the study."""

    hidden_size: int  # the equal hidden size, and the reference cell's size for the budget
    train_sequences: int  # adding-problem sequences per timed epoch
    steps: int  # steps per training sequence
    batch_size: int
    seq_batch: int  # the inference sequence: batch ...
    seq_steps: int  # ... and steps
    min_time_s: float  # repeat an inference call until this much time has passed ...
    max_repeats: int  # ... or this many calls


FULL = Plan(64, 256, 50, 32, 32, 64, 0.4, 5000)
TINY = Plan(6, 16, 5, 8, 2, 4, 0.005, 20)


def _adding(plan: Plan, seed: int) -> SequenceSplit:
    """The adding problem with INPUT_SIZE - 2 extra zero channels."""
    split = adding_split(plan.train_sequences, plan.steps, np.random.default_rng(seed))
    pad = np.zeros((*split.x.shape[:2], INPUT_SIZE - split.x.shape[2]), np.float32)
    x = np.concatenate([split.x, pad], axis=-1)
    return SequenceSplit(x=x, y=split.y, weight=split.weight, lengths=split.lengths)


class _FusedModel(nn.Module):
    """torch's ``nn.GRU`` or ``nn.LSTM`` with the same linear head as ``RecurrentModel``."""

    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        self.rnn = FUSED[cell](INPUT_SIZE, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        y: Tensor = self.head(out)  # (B, T, 1)
        return y


def fused_epoch(
    model: _FusedModel, optimizer: torch.optim.Optimizer, split: SequenceSplit, batch_size: int
) -> None:
    """One epoch of the adding problem with a fused model: the same loss, clipping and Adam."""
    model.train()
    for start in range(0, split.x.shape[0], batch_size):
        x = torch.from_numpy(split.x[start : start + batch_size])
        y = torch.from_numpy(split.y[start : start + batch_size])
        weight = torch.from_numpy(split.weight[start : start + batch_size])
        loss = (((model(x) - y) ** 2).mean(dim=-1) * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def fused_kernels(cell: str) -> str:
    """The ATen operators torch runs for ``nn.GRU``/``nn.LSTM`` forward and backward here."""
    model = _FusedModel(cell, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(2, 3, INPUT_SIZE)).sum().backward()
    names = sorted(
        {
            e.name
            for e in prof.events()
            if e.name.startswith("aten::")
            and any(k in e.name for k in ("rnn", "lstm", "gru", "mkldnn"))
        }
    )
    return ", ".join(f"`{name}`" for name in names)


@dataclass
class _Config:
    """One cell at one size, with everything built once and timed every round."""

    cell: str
    hidden: int
    parameters: int
    model: RecurrentModel
    split: SequenceSplit
    sessions: dict[str, ort.InferenceSession]  # graph form -> session
    fused: _FusedModel | None
    times: dict[str, list[float]] = field(default_factory=dict)  # quantity -> one per round

    def record(self, quantity: str, seconds: float) -> None:
        self.times.setdefault(quantity, []).append(check_finite(quantity, seconds))

    def median(self, quantity: str) -> float:
        return statistics.median(self.times[quantity])


def _session(model: RecurrentModel, form: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    payload = build_model_proto(model, form).SerializeToString()
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def build(cell: str, hidden: int, plan: Plan) -> _Config:
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, input_size=INPUT_SIZE, hidden_size=hidden, output_size=1)
    model = RecurrentModel(config)
    parameters = CELLS[cell].parameter_count(INPUT_SIZE, hidden)
    in_model = sum(p.numel() for p in model.cells.parameters())
    if parameters != in_model:  # the closed form is what the study reports: it must be right
        raise ArithmeticError(
            f"{cell}: parameter_count says {parameters}, the model has {in_model}"
        )
    forms = ["scan", "native"] if cell in NATIVE_CELLS else ["scan"]
    sessions = {form: _session(model.eval(), form) for form in forms}
    fused = _FusedModel(cell, hidden) if cell in FUSED else None
    return _Config(cell, hidden, parameters, model, _adding(plan, 0), sessions, fused)


def _feed(config: _Config, batch: int, steps: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {
        "x": rng.standard_normal((batch, steps, INPUT_SIZE)).astype(np.float32),
        "lengths": np.full(batch, steps, "i8"),
    }
    for name in state_names(config.model.config.num_states)[0]:
        feed[name] = np.zeros((1, batch, config.hidden), np.float32)
    return feed


def _median(fn: Callable[[], object], plan: Plan) -> float:
    return timing.median_seconds(fn, plan.min_time_s, plan.max_repeats)


def _time_training(config: _Config, plan: Plan) -> None:
    train_config = TrainConfig(cell=config.cell, batch_size=plan.batch_size)
    optimizer = torch.optim.Adam(config.model.parameters(), lr=train_config.lr)
    generator = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    train_epoch(config.model, optimizer, config.split, train_config, generator)
    config.record("train loop", time.perf_counter() - t0)
    if config.fused is not None:
        fused_optimizer = torch.optim.Adam(config.fused.parameters(), lr=train_config.lr)
        t0 = time.perf_counter()
        fused_epoch(config.fused, fused_optimizer, config.split, plan.batch_size)
        config.record("train fused", time.perf_counter() - t0)


def _time_inference(config: _Config, plan: Plan) -> None:
    model = config.model.eval()
    x, state = torch.randn(1, 1, INPUT_SIZE), model.initial_state(1)

    def eager_step() -> object:
        with torch.no_grad():
            return model(x, None, state)

    config.record("torch step", _median(eager_step, plan))
    step_feed = _feed(config, 1, 1)
    sequence_feed = _feed(config, plan.seq_batch, plan.seq_steps)
    for form, session in config.sessions.items():
        config.record(f"{form} step", _median(_runner(session, step_feed), plan))
        config.record(f"{form} sequence", _median(_runner(session, sequence_feed), plan))


def _runner(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: session.run(None, feed)


def measure_round(configs: list[_Config], plan: Plan) -> None:
    """Every quantity of every configuration once, one configuration after another."""
    for config in configs:
        _time_training(config, plan)
        _time_inference(config, plan)


Results = dict[str, list[_Config]]  # {setting: one config per cell}


def measure_all(sizes: dict[str, dict[str, int]], plan: Plan, rounds: int) -> Results:
    """Build every configuration, warm each up, then time ``rounds`` interleaved rounds."""
    results = {
        setting: [build(cell, hidden[cell], plan) for cell in CELLS]
        for setting, hidden in sizes.items()
    }
    everything = [config for configs in results.values() for config in configs]
    measure_round(everything, plan)  # warm-up: first-call allocations, lazy set-up
    for config in everything:
        config.times.clear()
    for _ in range(rounds):
        measure_round(everything, plan)
    return results


COLUMNS = (
    "cell",
    "hidden",
    "parameters",
    "vs lstm",
    "train s/epoch: project cell (Python loop)",
    "train s/epoch: torch nn.GRU/nn.LSTM",
    "torch eager µs/step",
    "ORT Scan µs/step",
    "ORT native op µs/step",
    "ORT Scan ms/sequence",
    "ORT native op ms/sequence",
)


def _value(config: _Config, quantity: str, scale: float, digits: str = ".3g") -> str:
    if quantity not in config.times:
        return "—"
    return f"{scale * config.median(quantity):{digits}}"


def _row(config: _Config, budget: int) -> tuple[str, ...]:
    return (
        config.cell,
        str(config.hidden),
        str(config.parameters),
        f"{config.parameters / budget:.2f}",
        _value(config, "train loop", 1.0),
        _value(config, "train fused", 1.0),
        _value(config, "torch step", 1e6),
        _value(config, "scan step", 1e6),
        _value(config, "native step", 1e6),
        _value(config, "scan sequence", 1e3),
        _value(config, "native sequence", 1e3),
    )


def _ratio(a: _Config, b: _Config, quantity: str) -> str:
    """Median over rounds of a/b, with the smallest and largest round."""
    ratios = [x / y for x, y in zip(a.times[quantity], b.times[quantity], strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


#: (label, inference form, training form) of each like-for-like comparison
FORMS = (("Scan / Scan", "scan", "train loop"), ("native op / native op", "native", "train fused"))
KINDS = ("step", "sequence")
RATIO_COLUMNS = ("cell", "setting", "form", "step, batch 1", "sequence", "training epoch")


def _ratio_rows(results: Results) -> tuple[tuple[str, ...], ...]:
    rows = []
    for setting, configs in results.items():
        by_cell = {c.cell: c for c in configs}
        lstm = by_cell["lstm"]
        for cell in CELLS:
            forms = FORMS if cell in NATIVE_CELLS else FORMS[:1]
            for label, inference, training in forms if cell != "lstm" else ():
                ratios = [_ratio(by_cell[cell], lstm, f"{inference} {kind}") for kind in KINDS]
                rows.append((cell, setting, label, *ratios, _ratio(by_cell[cell], lstm, training)))
    return tuple(rows)


def _figure(path: Path, results: Results) -> None:
    def values(quantity: str, scale: float) -> dict[str, dict[str, tuple[float, float]]]:
        return {
            setting: {c.cell: (scale * c.median(quantity), 0.0) for c in configs}
            for setting, configs in results.items()
        }

    bar_figure(
        path,
        "Cost of every cell (median over interleaved rounds)",
        [
            BarPanel(
                "parameters",
                {s: {c.cell: (c.parameters, 0.0) for c in cs} for s, cs in results.items()},
            ),
            BarPanel("training s/epoch (project cells, Python loop)", values("train loop", 1.0)),
            BarPanel("ORT Scan µs/step (batch 1)", values("scan step", 1e6)),
            BarPanel("ORT Scan ms/sequence", values("scan sequence", 1e3)),
        ],
    )


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    torch.set_num_threads(1)
    budget = CELLS[REFERENCE_CELL].parameter_count(INPUT_SIZE, plan.hidden_size)
    sizes = {
        "equal hidden": {cell: plan.hidden_size for cell in CELLS},
        "equal parameters": matched_sizes(INPUT_SIZE, REFERENCE_CELL, plan.hidden_size),
    }
    results = measure_all(sizes, plan, options.seeds)
    _figure(options.out / "efficiency.png", results)
    titles = {
        "equal hidden": (
            f"Equal hidden size (m = {plan.hidden_size})",
            "Every cell with the same number of units.",
        ),
        "equal parameters": (
            f"Equal parameter budget ({budget}, the {REFERENCE_CELL} at m = {plan.hidden_size})",
            "Every cell at the hidden size whose parameter count is nearest the budget.",
        ),
    }
    tables = [
        Table(
            title=titles[setting][0],
            caption=titles[setting][1],
            columns=COLUMNS,
            rows=tuple(_row(config, budget) for config in configs),
        )
        for setting, configs in results.items()
    ]
    tables.append(
        Table(
            title="Every cell against the LSTM in the same form",
            caption="Time relative to the LSTM's, median over rounds of the per-round ratio "
            "(smallest-largest round in brackets). Below 1 is faster than the LSTM.",
            columns=RATIO_COLUMNS,
            rows=_ratio_rows(results),
        )
    )
    return Report(
        study="efficiency",
        title="Efficiency: parameters, training time and inference latency per cell",
        description=_description(plan, options),
        tables=tables,
        figures=[
            (
                "efficiency.png",
                "Parameters, training time and ONNX Runtime latency "
                "(Scan graphs for every cell), both settings.",
            )
        ],
        notes=_notes(),
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"Input size {INPUT_SIZE}, one layer, a one-unit linear head, one thread everywhere. "
        f"Training: one epoch of the adding problem ({plan.train_sequences} sequences of "
        f"{plan.steps} steps, batches of {plan.batch_size}: forward, backward, gradient "
        "clipping, Adam), (a) with the project's cells in the Python time loop that `train` uses "
        "— no cuDNN and no fused kernel, on any device — and (b) for the GRU and LSTM with "
        f"torch's `nn.GRU` / `nn.LSTM` on the CPU, which run {fused_kernels('gru')} and "
        f"{fused_kernels('lstm')} (oneDNN's fused LSTM layer) here. Inference in ONNX Runtime "
        "(CPUExecutionProvider): every cell as the `scan` graph (one Scan per layer, input "
        "projection hoisted), the GRU and LSTM also as the native ONNX `GRU` "
        "(`linear_before_reset=1`) and `LSTM` ops; one step at batch 1, and one sequence of "
        f"batch {plan.seq_batch} x {plan.seq_steps} steps, the same inputs for every form. "
        "torch eager: one step at batch 1 of `RecurrentModel`. Every configuration is measured "
        f"once per round, in turn, for {options.seeds} rounds after a warm-up round; each "
        "inference number is itself the median of repeated calls; the tables show the median "
        "over rounds."
    )


def _notes() -> list[str]:
    return [
        "Wall-clock numbers depend on the machine and its load (this one is shared): compare "
        "cells within one report, not across machines. The interleaved rounds spread a change "
        "of load over every cell instead of charging it to one.",
        "No GPU was used: cuDNN's fused GRU and LSTM kernels are not measured here.",
    ]
