"""Study ``efficiency``: parameters, training time and inference latency of every cell.

Two comparisons: every cell at the same hidden size, and every cell at the hidden size that gives it
(about) the parameter budget of a reference cell (the LSTM at the same hidden size), solved from the
cells' closed-form ``parameter_count``.

- parameters: the recurrent cell's own weights (closed form; the linear head is the same for all);
- training time: one epoch of the adding problem (forward, backward, Adam) with
  :func:`training.train.train_epoch`, the median of a few epochs after a warm-up epoch;
- inference: one step at batch 1 (the streaming case), median latency of torch eager
  (``RecurrentModel`` under ``no_grad``) and of ONNX Runtime on the graph the exporter writes
  (``graph="auto"``), both on one thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training import timing
from training.cells import CELLS
from training.experiments.options import StudyOptions
from training.experiments.plots import BarPanel, bar_figure
from training.experiments.report import Report, Table, check_finite, mean_std, spread
from training.export import resolve_graph
from training.model import ModelConfig, RecurrentModel
from training.onnx_graph import build_model_proto, state_names
from training.tasks import SequenceSplit
from training.tasks.adding import adding_split
from training.train import TrainConfig, train_epoch

INPUT_SIZE = 8  # features per step for every model in this study
REFERENCE_CELL = "lstm"  # the parameter budget is this cell's count at the plan's hidden size


@dataclass(frozen=True)
class Plan:
    """The sizes of one configuration of the study."""

    hidden_size: int  # the equal hidden size, and the reference cell's size for the budget
    train_sequences: int  # adding-problem sequences per timed epoch
    steps: int  # steps per sequence
    batch_size: int
    timed_epochs: int  # epochs timed after one warm-up epoch
    min_time_s: float  # repeat an inference call until this much time has passed ...
    max_repeats: int  # ... or this many calls


FULL = Plan(64, 256, 50, 32, 3, 0.3, 2000)
TINY = Plan(6, 16, 5, 8, 1, 0.005, 20)


@dataclass(frozen=True)
class Measurement:
    """One cell at one size with one seed."""

    parameters: int
    train_epoch_s: float
    torch_step_us: float
    ort_step_us: float


def hidden_for_budget(cell: str, input_size: int, budget: int) -> int:
    """The hidden size whose ``parameter_count`` is nearest to ``budget`` (the smaller on a tie)."""
    count = CELLS[cell].parameter_count
    m = 1
    while count(input_size, m + 1) <= budget:
        m += 1
    above = count(input_size, m + 1)
    return m + 1 if above - budget < budget - count(input_size, m) else m


def median_seconds(fn: Callable[[], object], plan: Plan) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    return timing.median_seconds(fn, plan.min_time_s, plan.max_repeats)


def build(cell: str, hidden: int, seed: int) -> RecurrentModel:
    torch.manual_seed(seed)
    config = ModelConfig(cell=cell, input_size=INPUT_SIZE, hidden_size=hidden, output_size=1)
    return RecurrentModel(config)


def time_training(model: RecurrentModel, plan: Plan, seed: int) -> float:
    """Median seconds per epoch of the adding problem (with INPUT_SIZE - 2 zero channels)."""
    split = adding_split(plan.train_sequences, plan.steps, np.random.default_rng(seed))
    pad = np.zeros((*split.x.shape[:2], INPUT_SIZE - split.x.shape[2]), np.float32)
    split = SequenceSplit(
        x=np.concatenate([split.x, pad], axis=-1),
        y=split.y,
        weight=split.weight,
        lengths=split.lengths,
    )
    config = TrainConfig(cell=model.config.cell, batch_size=plan.batch_size, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(plan.timed_epochs + 1):  # the first epoch warms up the allocator
        t0 = time.perf_counter()
        train_epoch(model, optimizer, split, config, generator)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def time_torch_step(model: RecurrentModel, plan: Plan) -> float:
    model.eval()
    x = torch.randn(1, 1, INPUT_SIZE)
    state = model.initial_state(1)

    def step() -> object:
        with torch.no_grad():
            return model(x, None, state)

    return median_seconds(step, plan)


def time_ort_step(model: RecurrentModel, plan: Plan) -> float:
    model.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    form = resolve_graph(model.config.cell, "auto")
    payload = build_model_proto(model, form).SerializeToString()
    session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.randn(1, 1, INPUT_SIZE).astype(np.float32), "lengths": np.ones(1, "i8")}
    for name in state_names(model.config.num_states)[0]:
        feed[name] = np.zeros((1, 1, model.config.hidden_size), np.float32)
    return median_seconds(lambda: session.run(None, feed), plan)


def measure(cell: str, hidden: int, seed: int, plan: Plan) -> Measurement:
    model = build(cell, hidden, seed)
    parameters = CELLS[cell].parameter_count(INPUT_SIZE, hidden)
    in_model = sum(p.numel() for p in model.cells.parameters())
    if parameters != in_model:  # the closed form is what the study reports: it must be right
        raise ArithmeticError(
            f"{cell}: parameter_count says {parameters}, the model has {in_model}"
        )
    return Measurement(
        parameters=parameters,
        train_epoch_s=check_finite("train time", time_training(model, plan, seed)),
        torch_step_us=1e6 * time_torch_step(model, plan),
        ort_step_us=1e6 * time_ort_step(model, plan),
    )


COLUMNS = (
    "cell",
    "hidden",
    "parameters",
    "vs lstm",
    "train s/epoch",
    "torch µs/step",
    "ORT µs/step",
)


def _row(cell: str, hidden: int, runs: list[Measurement], reference: int) -> tuple[str, ...]:
    params = runs[0].parameters
    return (
        cell,
        str(hidden),
        str(params),
        f"{params / reference:.2f}",
        mean_std([r.train_epoch_s for r in runs]),
        mean_std([r.torch_step_us for r in runs]),
        mean_std([r.ort_step_us for r in runs]),
    )


def _panel_values(
    results: dict[str, dict[str, list[Measurement]]], pick: Callable[[Measurement], float]
) -> dict[str, dict[str, tuple[float, float]]]:
    """``{setting: {cell: (mean, std)}}`` of one quantity, for a bar panel."""
    return {
        setting: {cell: spread([pick(r) for r in runs]) for cell, runs in by_cell.items()}
        for setting, by_cell in results.items()
    }


Results = dict[str, dict[str, list[Measurement]]]  # {setting: {cell: one Measurement per seed}}


def measure_all(sizes: dict[str, dict[str, int]], plan: Plan, options: StudyOptions) -> Results:
    """Measure every cell at every size, one round per seed.

    Rounds rather than one cell at a time: a change in the machine's load between rounds then
    shows as spread over seeds rather than as a difference between cells.
    """
    results: Results = {setting: {cell: [] for cell in CELLS} for setting in sizes}
    for seed in options.seed_list:
        for setting, hidden in sizes.items():
            for cell in CELLS:
                results[setting][cell].append(measure(cell, hidden[cell], seed, plan))
    return results


def _table(
    title: str,
    caption: str,
    hidden: dict[str, int],
    runs: dict[str, list[Measurement]],
    budget: int,
) -> Table:
    rows = tuple(_row(cell, hidden[cell], runs[cell], budget) for cell in CELLS)
    return Table(title=title, caption=caption, columns=COLUMNS, rows=rows)


def _figure(path: Path, results: Results) -> None:
    bar_figure(
        path,
        "Cost of every cell (mean ± std over seeds)",
        [
            BarPanel("parameters", _panel_values(results, lambda r: r.parameters)),
            BarPanel("training s/epoch", _panel_values(results, lambda r: r.train_epoch_s)),
            BarPanel("ORT µs/step (batch 1)", _panel_values(results, lambda r: r.ort_step_us)),
            BarPanel("torch µs/step (batch 1)", _panel_values(results, lambda r: r.torch_step_us)),
        ],
    )


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    torch.set_num_threads(1)
    budget = CELLS[REFERENCE_CELL].parameter_count(INPUT_SIZE, plan.hidden_size)
    equal_hidden = {cell: plan.hidden_size for cell in CELLS}
    equal_budget = {cell: hidden_for_budget(cell, INPUT_SIZE, budget) for cell in CELLS}
    results = measure_all(
        {"equal hidden": equal_hidden, "equal parameters": equal_budget}, plan, options
    )
    figure = "efficiency.png"
    _figure(options.out / figure, results)
    return Report(
        study="efficiency",
        title="Efficiency: parameters, training time and inference latency per cell",
        description=_description(plan, options),
        tables=[
            _table(
                f"Equal hidden size (m = {plan.hidden_size})",
                "Every cell with the same number of units.",
                equal_hidden,
                results["equal hidden"],
                budget,
            ),
            _table(
                f"Equal parameter budget ({budget}, the {REFERENCE_CELL} at m = "
                f"{plan.hidden_size})",
                "Every cell at the hidden size whose parameter count is nearest the budget.",
                equal_budget,
                results["equal parameters"],
                budget,
            ),
        ],
        figures=[(figure, "Parameters, training time and step latency per cell, both settings.")],
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"Input size {INPUT_SIZE}, one layer, a one-unit linear head. "
        f"Training: one epoch of the adding problem, {plan.train_sequences} sequences of "
        f"{plan.steps} steps in batches of {plan.batch_size} (forward, backward, Adam), median of "
        f"{plan.timed_epochs} epoch(s) after a warm-up epoch. Inference: one step at batch 1, "
        "median latency of torch eager and of ONNX Runtime on the graph `export` writes "
        "(`graph=auto`: native for lstm, scan otherwise), both on one thread. "
        f"{options.seeds} seed(s): the timings are repeated per seed, parameters do not vary. "
        "'vs lstm' is the parameter count relative to the budget. Wall-clock numbers depend on the "
        "machine's load: compare cells within one report, not across machines."
    )
