"""Study ``forecast``: every cell on two real series against linear baselines, and on adding.

- ``co2``: next-week forecast of the weekly Mauna Loa CO2 series (statsmodels), as weekly changes
  (``difference=True``): a level model would have to extrapolate the rising trend. The error of a
  change is the error of the level, so RMSE is in ppm.
- ``sunspots``: next-year forecast of the yearly sunspot numbers (statsmodels), on levels: a
  nonlinear series (fast rise, slow fall, cycles of varying height) where a recurrent model has
  something to add over a linear autoregression.
- ``adding``: test MSE on the adding problem; always answering 1.0 scores about 1/6.

All seeds of a cell train at once as a :class:`SeedEnsemble` (each seed as ``train`` would train
it alone: its own shuffles, clipping, Adam state and early stopping on the validation loss) and
are scored with the task's own ``evaluate``, as ``train`` scores a run.

Every series table carries the baselines of :mod:`training.experiments.baselines` (persistence,
climatology, harmonic regression, AR(p), AR(p) + harmonics), fitted on the training part only and
scored on the same positions, and says for every cell whether its 95% interval lies below the best
of them. The epoch cap is set well past where the validation loss stops improving, so that
the early stop is what ends a run (the tables show where it did).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.experiments.baselines import Baseline, Seasons, baselines
from training.experiments.ensemble import SeedEnsemble
from training.experiments.options import StudyOptions, run_grid
from training.experiments.plots import BarPanel, bar_figure
from training.experiments.report import Report, Table, check_finite
from training.experiments.stats import Interval, decimals_for, mean_ci, t_interval
from training.model import ModelConfig, RecurrentModel
from training.tasks import SequenceSplit, SeriesTask, Task, TaskOptions, build_task
from training.train import MIN_RELATIVE_IMPROVEMENT

BATCH = 32  # sequences per optimiser step, as ``train`` defaults to


@dataclass(frozen=True)
class SeriesPlan:
    """How one real series is forecast."""

    title: str  # the table's heading
    unit: str  # of the RMSE
    difference: bool  # forecast changes rather than levels
    seasons: Seasons  # the cycle the baselines use


SERIES: dict[str, SeriesPlan] = {
    "co2": SeriesPlan(
        "co2: next-week forecast of weekly Mauna Loa CO2",
        "ppm",
        difference=True,
        seasons=Seasons(period=365.25 / 7, harmonics=2, bins=52),
    ),
    "sunspots": SeriesPlan(
        "sunspots: next-year forecast of yearly sunspot numbers",
        "sunspot number",
        difference=False,
        seasons=Seasons(period=11.0, harmonics=1, bins=1),
    ),
}


@dataclass(frozen=True)
class Plan:
    hidden_size: int
    epochs: int  # the cap on the series; early stopping ends the runs before it
    windows: int  # random training windows of each series' train part
    lr: float
    patience: int
    adding_epochs: int
    adding_steps: int  # sequence length of the adding problem
    adding_train: int  # training sequences
    adding_eval: int  # validation and test sequences each


FULL = Plan(
    32,
    epochs=150,
    windows=128,
    lr=5e-3,
    patience=10,
    adding_epochs=10,
    adding_steps=30,
    adding_train=1000,
    adding_eval=200,
)
TINY = Plan(
    4,
    epochs=1,
    windows=4,
    lr=1e-2,
    patience=1,
    adding_epochs=1,
    adding_steps=6,
    adding_train=16,
    adding_eval=8,
)

Summary = dict[str, Any]


class _Fit:
    """All seeds of one cell on one task, trained as a :class:`SeedEnsemble` the way ``train``
    trains one model: Adam, batches of ``BATCH``, the normalised MSE on the scored steps,
    gradient norm clipped at 1 per seed, early stopping per seed on the validation loss."""

    def __init__(self, cell: str, task: Task, seeds: int, plan: Plan) -> None:
        norm = task.normalization
        config = ModelConfig(
            cell,
            task.input_size,
            plan.hidden_size,
            task.output_size,
            input_mean=norm.input_mean,
            input_std=norm.input_std,
            output_mean=norm.output_mean,
            output_std=norm.output_std,
        )
        self.task, self.plan = task, plan
        self.ensemble = SeedEnsemble(config, range(seeds))
        self.optimizer = torch.optim.Adam(self.ensemble.parameters(), lr=plan.lr)
        self.rng = np.random.default_rng(seeds)
        self.best_loss = [math.inf] * seeds
        self.best_epoch = [0] * seeds
        self.best_state: list[dict[str, Tensor]] = [{} for _ in range(seeds)]

    def _losses(self, split: SequenceSplit, rows: np.ndarray) -> Tensor:
        """``(S,)`` each seed's weighted MSE (normalised) on its rows ``(S, B)`` of ``split``."""
        steps = int(split.lengths[rows].max())
        x = torch.from_numpy(split.x[rows, :steps]).permute(1, 2, 0, 3)  # (B, T, S, n)
        y = torch.from_numpy(split.y[rows, :steps]).permute(1, 2, 0, 3)  # (B, T, S, o)
        weight = torch.from_numpy(split.weight[rows, :steps]).permute(1, 2, 0)  # (B, T, S)
        config = self.ensemble.member_config
        target = (y - torch.tensor(config.output_mean or (0.0,))) / torch.tensor(
            config.output_std or (1.0,)
        )
        per_step = ((self.ensemble(x.contiguous()) - target) ** 2).mean(dim=-1)  # (B, T, S)
        losses: Tensor = (per_step * weight).sum(dim=(0, 1)) / weight.sum(dim=(0, 1))
        return losses

    def epoch(self) -> None:
        self.ensemble.train()
        split = self.task.train
        size = self.ensemble.size
        orders = np.stack([self.rng.permutation(split.x.shape[0]) for _ in range(size)])
        for start in range(0, orders.shape[1], BATCH):
            loss = self._losses(split, orders[:, start : start + BATCH]).sum()
            self.optimizer.zero_grad()
            torch.autograd.backward(loss)
            self.ensemble.clip_grad_norm_(1.0)
            self.optimizer.step()

    @torch.no_grad()
    def keep(self, epoch: int) -> bool:
        """Keep each seed's best state; True when every seed has stalled."""
        self.ensemble.eval()
        split = self.task.validation
        rows = np.tile(np.arange(split.x.shape[0]), (self.ensemble.size, 1))  # (S, N)
        for i, loss in enumerate(self._losses(split, rows).tolist()):
            if loss < self.best_loss[i] * (1 - MIN_RELATIVE_IMPROVEMENT):
                self.best_loss[i], self.best_epoch[i] = loss, epoch
                member = self.ensemble.member(i).state_dict()
                self.best_state[i] = {k: v.clone() for k, v in member.items()}
        return all(epoch - best >= self.plan.patience for best in self.best_epoch)

    def summaries(self, epochs_run: int, wall_time: float) -> list[Summary]:
        """What ``train`` would report for each seed, from its best state."""
        out = []
        for i, state in enumerate(self.best_state):
            model = RecurrentModel(self.ensemble.member_config)
            model.load_state_dict(state)
            model.eval()
            metrics = {
                split: self.task.evaluate(model, self.task.split(split))
                for split in ("validation", "test")
            }
            out.append(
                {
                    "parameters": model.parameter_count(),
                    "epochs_run": epochs_run,
                    "best_epoch": self.best_epoch[i],
                    "wall_time_s": wall_time,
                    "metrics": metrics,
                }
            )
        return out


def _train(
    cell: str, task_name: str, seeds: int, epochs: int, options: TaskOptions, plan: Plan
) -> list[Summary]:
    """Train every seed of one cell on one task; return one summary per seed."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    fit = _Fit(cell, build_task(task_name, options), seeds, plan)
    epochs_run = epochs
    for epoch in range(1, epochs + 1):
        fit.epoch()
        if fit.keep(epoch):
            epochs_run = epoch
            break
    return fit.summaries(epochs_run, time.perf_counter() - started)


def _metric(summaries: list[Summary], split: str, name: str) -> list[float]:
    label = f"{split} {name}"
    return [check_finite(label, s["metrics"][split][name]) for s in summaries]


def _task_options(plan: Plan) -> dict[str, tuple[int, TaskOptions]]:
    """Every task of the study with its epoch cap and options."""
    tasks = {
        name: (plan.epochs, TaskOptions(difference=series.difference, train_windows=plan.windows))
        for name, series in SERIES.items()
    }
    tasks["adding"] = (
        plan.adding_epochs,
        TaskOptions(
            seq_len=plan.adding_steps, train_size=plan.adding_train, eval_size=plan.adding_eval
        ),
    )
    return tasks


Results = dict[str, dict[str, list[Summary]]]  # {task: {cell: one summary per seed}}


def train_all(plan: Plan, options: StudyOptions) -> Results:
    """Train every cell with every seed on every task."""
    tasks = _task_options(plan)

    def call(task: str, cell: str) -> tuple[object, ...]:
        return cell, task, options.seeds, *tasks[task], plan

    return run_grid(_train, list(tasks), call, options.jobs)


SERIES_COLUMNS = (
    "model",
    "parameters",
    "validation RMSE",
    "test RMSE",
    "test RMSE / best baseline",
    "beats the best baseline?",
    "epochs run (best)",
)
ADDING_COLUMNS = (
    "cell",
    "parameters (with head)",
    "validation MSE",
    "test MSE",
    "constant-guess MSE",
    "epochs run (best)",
)


def verdict(interval: Interval, reference: float) -> str:
    """Whether a 95% interval of a cell's test RMSE lies below, above or around ``reference``."""
    if interval.count < 2:
        return "below" if interval.mean < reference else "not below"
    if interval.high < reference:
        return "yes (interval below)"
    if interval.low > reference:
        return "no (interval above)"
    return "no (interval overlaps)"


def _epochs(runs: list[Summary]) -> str:
    run = statistics.median(r["epochs_run"] for r in runs)
    best = statistics.median(r["best_epoch"] for r in runs)
    return f"{run:g} ({best:g})"


def _cell_row(cell: str, runs: list[Summary], best: Baseline) -> tuple[str, ...]:
    test = _metric(runs, "test", "rmse")
    ratio = [value / best.test_rmse for value in test]
    return (
        cell,
        str(runs[0]["parameters"]),
        mean_ci(_metric(runs, "validation", "rmse")),
        mean_ci(test),
        mean_ci(ratio),
        verdict(t_interval(test), best.test_rmse),
        _epochs(runs),
    )


def _three_digits(value: float) -> str:
    return f"{value:.{decimals_for(value, 3)}f}"


def _baseline_row(baseline: Baseline, best: Baseline) -> tuple[str, ...]:
    return (
        f"*{baseline.name}*",
        str(baseline.parameters),
        _three_digits(baseline.validation_rmse),
        _three_digits(baseline.test_rmse),
        f"{baseline.test_rmse / best.test_rmse:.3f}",
        "(the best baseline)" if baseline is best else "—",
        "—",
    )


def best_baseline(candidates: list[Baseline]) -> Baseline:
    """The baseline a cell must beat: the lowest validation RMSE (chosen without the test part)."""
    return min(candidates, key=lambda b: b.validation_rmse)


def _series_table(
    series: SeriesPlan, candidates: list[Baseline], runs: dict[str, list[Summary]]
) -> Table:
    best = best_baseline(candidates)
    rows = [_baseline_row(b, best) for b in candidates]
    rows += [_cell_row(cell, cell_runs, best) for cell, cell_runs in runs.items()]
    return Table(
        title=f"{series.title} (RMSE in {series.unit})",
        caption=(
            "Baselines in italics (fitted on the training part; the AR order chosen on "
            "validation); cells as mean ± 95% t-interval over seeds. The best baseline is the "
            "one with the lowest validation RMSE. A cell beats it only if its whole interval "
            "of test RMSE lies below the baseline's test RMSE."
        ),
        columns=SERIES_COLUMNS,
        rows=tuple(rows),
    )


def _adding_row(cell: str, runs: list[Summary]) -> tuple[str, ...]:
    return (
        cell,
        str(runs[0]["parameters"]),
        mean_ci(_metric(runs, "validation", "mse")),
        mean_ci(_metric(runs, "test", "mse")),
        mean_ci(_metric(runs, "test", "baseline_mse")),
        _epochs(runs),
    )


def _interval_bars(runs: dict[str, list[Summary]], scale: float) -> dict[str, tuple[float, float]]:
    bars = {}
    for cell, cell_runs in runs.items():
        interval = t_interval([v / scale for v in _metric(cell_runs, "test", "rmse")])
        half = 0.0 if interval.count < 2 else interval.half_width
        bars[cell] = (interval.mean, half)
    return bars


def _figure(path: Path, results: Results, best: dict[str, Baseline]) -> None:
    panels = [
        BarPanel(
            f"{name} test RMSE / best baseline's",
            {"test": _interval_bars(results[name], best[name].test_rmse)},
            reference=1.0,
            reference_label=best[name].name,
        )
        for name in SERIES
    ]
    adding = {
        cell: (statistics.fmean(_metric(runs, "test", "mse")), 0.0)
        for cell, runs in results["adding"].items()
    }
    constant = statistics.fmean(_metric(results["adding"]["gru"], "test", "baseline_mse"))
    panels.append(
        BarPanel("adding test MSE", {"test": adding}, constant, "constant guess 1.0", log=True)
    )
    bar_figure(path, "Test error per cell (mean and 95% t-interval over seeds)", panels)


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    results = train_all(plan, options)
    candidates = {
        name: baselines(_series_task(name), series.seasons) for name, series in SERIES.items()
    }
    tables = [
        _series_table(series, candidates[name], results[name]) for name, series in SERIES.items()
    ]
    best = {name: best_baseline(found) for name, found in candidates.items()}
    _figure(options.out / "forecast.png", results, best)
    tables.append(
        Table(
            title=f"adding: sum of two marked values in {plan.adding_steps} steps",
            caption="MSE at the last step, mean ± 95% t-interval over seeds; the constant guess "
            "1.0 scores about 1/6.",
            columns=ADDING_COLUMNS,
            rows=tuple(_adding_row(cell, runs) for cell, runs in results["adding"].items()),
        )
    )
    return Report(
        study="forecast",
        title="Forecasting: two real series against linear baselines, and the adding problem",
        description=_description(plan, options),
        tables=tables,
        figures=[
            (
                "forecast.png",
                "Test RMSE of every cell relative to the best baseline (dashed line at 1), "
                "and the adding problem's test MSE against the constant guess.",
            )
        ],
        notes=[
            "'epochs run (best)': the median over seeds of the epochs a run took and of the "
            "epoch whose weights it kept; a run that stops before the cap was stopped early.",
            "Small differences between cells (a few thousandths of a ppm) depend on the "
            "machine's floating-point numerics and on the seeds; the comparison with the "
            "baselines does not.",
        ],
    )


def _series_task(name: str) -> SeriesTask:
    task = build_task(name, TaskOptions(difference=SERIES[name].difference))
    assert isinstance(task, SeriesTask)
    return task


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"One layer of {plan.hidden_size} units per cell, Adam (lr {plan.lr}, batch 32, "
        f"gradient norm clipped at 1), early stopping after {plan.patience} epochs without a "
        f"better validation loss, at most {plan.epochs} epochs. Series: {plan.windows} random "
        "windows of 64-104 steps from the first 70% of the series; validation and test run "
        "over the whole series with the state carried, as when streaming, and count only their "
        "own 15%. co2 forecasts weekly changes, sunspots yearly levels. adding: at most "
        f"{plan.adding_epochs} epochs on {plan.adding_train} sequences of {plan.adding_steps} "
        f"steps, {plan.adding_eval} validation and {plan.adding_eval} test sequences. "
        f"{options.seeds} seeds per cell, trained together as a block-diagonal ensemble of the "
        "project's cells (each seed as if alone: its own initial weights, shuffles, clipping, "
        "Adam state and early stopping); the data (training windows, adding sequences) is "
        "drawn once with seed 0 and shared, so the seeds differ in initial weights and order. "
        "Cells show the mean ± the 95% t-interval over seeds."
    )
