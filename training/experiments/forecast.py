"""Study ``forecast``: validation and test error of every cell on a real series and on adding.

- ``co2``: next-week forecast of the weekly Mauna Loa CO2 series (statsmodels), as weekly changes
  (``difference=True``): a level model would have to extrapolate the rising trend past anything seen
  in training. RMSE is reported in ppm on the level (the change's error is the level's error), with
  the persistence forecast ("next week equals this week") as the baseline.
- ``adding``: test MSE on the adding problem; always answering 1.0 scores about 1/6.

Each run is one call of :func:`training.train.train` with early stopping on the validation loss.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.cells import CELLS
from training.experiments.options import StudyOptions, run_all
from training.experiments.plots import BarPanel, bar_figure
from training.experiments.report import Report, Table, check_finite, mean_std, spread
from training.tasks import TaskOptions
from training.train import TrainConfig, train


@dataclass(frozen=True)
class Plan:
    hidden_size: int
    co2_epochs: int
    co2_windows: int  # random training windows of the co2 train part
    adding_epochs: int
    adding_steps: int  # sequence length of the adding problem
    adding_train: int  # training sequences
    adding_eval: int  # validation and test sequences each
    lr: float
    patience: int


FULL = Plan(
    32,
    co2_epochs=10,
    co2_windows=128,
    adding_epochs=10,
    adding_steps=30,
    adding_train=1000,
    adding_eval=200,
    lr=1e-2,
    patience=5,
)
TINY = Plan(
    4,
    co2_epochs=1,
    co2_windows=4,
    adding_epochs=1,
    adding_steps=6,
    adding_train=16,
    adding_eval=8,
    lr=1e-2,
    patience=1,
)


def _train(
    cell: str, task: str, seed: int, epochs: int, options: TaskOptions, plan: Plan, workdir: Path
) -> dict[str, Any]:
    """Train one model; return its summary (parameters, metrics on validation and test)."""
    config = TrainConfig(
        cell=cell,
        task=task,
        hidden_size=plan.hidden_size,
        epochs=epochs,
        lr=plan.lr,
        patience=plan.patience,
        seed=seed,
        progress=False,
        out=workdir / f"{task}-{cell}-{seed}",
        task_options=options,
    )
    return train(config).summary


def _metric(summaries: list[dict[str, Any]], split: str, name: str) -> list[float]:
    label = f"{split} {name}"
    return [check_finite(label, s["metrics"][split][name]) for s in summaries]


CO2_COLUMNS = (
    "cell",
    "parameters (with head)",
    "validation RMSE",
    "test RMSE",
    "test persistence RMSE",
    "test skill",
    "train s",
)
ADDING_COLUMNS = (
    "cell",
    "parameters (with head)",
    "validation MSE",
    "test MSE",
    "constant-guess MSE",
    "train s",
)


def _co2_row(cell: str, runs: list[dict[str, Any]]) -> tuple[str, ...]:
    return (
        cell,
        str(runs[0]["parameters"]),
        mean_std(_metric(runs, "validation", "rmse")),
        mean_std(_metric(runs, "test", "rmse")),
        mean_std(_metric(runs, "test", "persistence_rmse")),
        mean_std(_metric(runs, "test", "skill")),
        mean_std([r["wall_time_s"] for r in runs]),
    )


def _adding_row(cell: str, runs: list[dict[str, Any]]) -> tuple[str, ...]:
    return (
        cell,
        str(runs[0]["parameters"]),
        mean_std(_metric(runs, "validation", "mse")),
        mean_std(_metric(runs, "test", "mse")),
        mean_std(_metric(runs, "test", "baseline_mse")),
        mean_std([r["wall_time_s"] for r in runs]),
    )


def _bars(results: dict[str, list[dict[str, Any]]], split: str, name: str) -> dict[str, Any]:
    """``{cell: (mean, std)}`` of one metric, for a bar panel."""
    return {cell: spread(_metric(runs, split, name)) for cell, runs in results.items()}


Summaries = dict[str, list[dict[str, Any]]]  # {cell: one training summary per seed}


def train_all(plan: Plan, options: StudyOptions) -> dict[str, Summaries]:
    """Train every cell with every seed on both tasks: ``{task: {cell: [summary, ...]}}``."""
    co2_options = TaskOptions(difference=True, train_windows=plan.co2_windows)
    adding_options = TaskOptions(
        seq_len=plan.adding_steps, train_size=plan.adding_train, eval_size=plan.adding_eval
    )
    tasks = {"co2": (plan.co2_epochs, co2_options), "adding": (plan.adding_epochs, adding_options)}
    keys = [(task, cell, seed) for task in tasks for cell in CELLS for seed in options.seed_list]
    with tempfile.TemporaryDirectory(prefix="forecast-") as tmp:
        calls = [(cell, task, seed, *tasks[task], plan, Path(tmp)) for task, cell, seed in keys]
        summaries = run_all(_train, calls, options.jobs)
    results: dict[str, Summaries] = {task: {cell: [] for cell in CELLS} for task in tasks}
    for (task, cell, _), summary in zip(keys, summaries, strict=True):
        results[task][cell].append(summary)
    return results


def _figure(path: Path, co2: Summaries, adding: Summaries) -> None:
    persistence = statistics.fmean(_metric(co2["gru"], "test", "persistence_rmse"))
    constant = statistics.fmean(_metric(adding["gru"], "test", "baseline_mse"))
    bar_figure(
        path,
        "Test error per cell (mean ± std over seeds)",
        [
            BarPanel(
                "co2 test RMSE (ppm)",
                {"test": _bars(co2, "test", "rmse")},
                reference=persistence,
                reference_label="persistence",
            ),
            BarPanel(
                "adding test MSE",
                {"test": _bars(adding, "test", "mse")},
                reference=constant,
                reference_label="constant guess 1.0",
                log=True,
            ),
        ],
    )


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    results = train_all(plan, options)
    co2, adding = results["co2"], results["adding"]
    figure = "forecast.png"
    _figure(options.out / figure, co2, adding)
    return Report(
        study="forecast",
        title="Forecasting: the CO2 series and the adding problem",
        description=_description(plan, options),
        tables=[
            Table(
                title="co2: next-week forecast of weekly Mauna Loa CO2 (ppm)",
                caption="RMSE on the validation and test weeks (the last 15% each, by time); "
                "skill = 1 - RMSE / persistence RMSE (above 0 beats persistence).",
                columns=CO2_COLUMNS,
                rows=tuple(_co2_row(cell, runs) for cell, runs in co2.items()),
            ),
            Table(
                title=f"adding: sum of two marked values in {plan.adding_steps} steps",
                caption="MSE at the last step; the constant guess 1.0 scores about 1/6.",
                columns=ADDING_COLUMNS,
                rows=tuple(_adding_row(cell, runs) for cell, runs in adding.items()),
            ),
        ],
        figures=[(figure, "Test error per cell against its baseline (dashed).")],
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"One layer of {plan.hidden_size} units per cell, Adam (lr {plan.lr}, batch 32), early "
        f"stopping after {plan.patience} epochs without a better validation loss. co2: at most "
        f"{plan.co2_epochs} epochs on {plan.co2_windows} random windows of the first 70% of the "
        "series, forecasting weekly changes; validation and test run over the whole series with "
        "the state carried, as when streaming. adding: at most "
        f"{plan.adding_epochs} epochs on {plan.adding_train} sequences of {plan.adding_steps} "
        f"steps, {plan.adding_eval} validation and {plan.adding_eval} test sequences. "
        f"{options.seeds} seed(s) per cell; tables show mean ± std over seeds."
    )
