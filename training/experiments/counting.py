"""Study ``counting``: do the cells learn aⁿbⁿ and aⁿbⁿcⁿ, and count past the training range?

Each cell is trained with :func:`training.train.train` on next-symbol prediction for n = 1..N (the
``anbn`` and ``anbncn`` tasks) and then scored on every n up to a much larger bound with
:meth:`CountingTask.accuracy_by_n`. A string counts as right when every next-symbol prediction is
right; that implies the model also rejects every wrong continuation (a string that ends early, runs
on, or switches symbol at the wrong count), so "accepted and rejected correctly" is this test.

The figure of merit follows Weiss, Goldberg & Yahav (2018): the largest n such that every n' <= n is
right. Training stops early on the validation loss (n = 1..N).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from training.cells import CELLS
from training.experiments.options import StudyOptions, run_all
from training.experiments.plots import CurvePanel, curve_figure
from training.experiments.report import Report, Table, mean_std
from training.tasks import CountingTask, TaskOptions, build_task
from training.train import TrainConfig, train

LANGUAGES = {"anbn": "aⁿbⁿ", "anbncn": "aⁿbⁿcⁿ"}


@dataclass(frozen=True)
class Plan:
    hidden_size: int
    n_train_max: int  # train and validate on n = 1..n_train_max
    n_eval_max: int  # score every n = 1..n_eval_max
    epochs: int
    lr: float
    batch_size: int
    patience: int


FULL = Plan(
    hidden_size=10, n_train_max=10, n_eval_max=200, epochs=40, lr=2e-2, batch_size=16, patience=10
)
TINY = Plan(
    hidden_size=4, n_train_max=3, n_eval_max=8, epochs=2, lr=1e-2, batch_size=16, patience=2
)


@dataclass(frozen=True)
class Run:
    """One trained model's results."""

    parameters: int
    accepted: dict[int, float]  # n -> 1.0 if the string for n is right, else 0.0
    wall_time_s: float

    def largest_correct_n(self) -> int:
        """The largest n such that every n' <= n is right (0 if n = 1 is wrong)."""
        n = 0
        while self.accepted.get(n + 1) == 1.0:
            n += 1
        return n

    def fraction_right(self, ns: range) -> float:
        return statistics.fmean(self.accepted[n] for n in ns)


def train_one(language: str, cell: str, seed: int, plan: Plan, workdir: Path) -> Run:
    task_options = TaskOptions(n_train_max=plan.n_train_max, n_test_max=plan.n_train_max + 1)
    config = TrainConfig(
        cell=cell,
        task=language,
        hidden_size=plan.hidden_size,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        patience=plan.patience,
        seed=seed,
        progress=False,
        out=workdir / f"{language}-{cell}-{seed}",
        task_options=task_options,
    )
    started = time.perf_counter()
    result = train(config)
    wall_time = time.perf_counter() - started
    task = build_task(language, task_options)
    assert isinstance(task, CountingTask)
    accepted = task.accuracy_by_n(result.model, range(1, plan.n_eval_max + 1))
    return Run(result.summary["parameters"], accepted, wall_time)


COLUMNS = (
    "cell",
    "parameters (with head)",
    "right in training range",
    "right beyond it",
    "largest n all right",
    "seeds past training n",
    "train s",
)


def _row(cell: str, runs: list[Run], plan: Plan) -> tuple[str, ...]:
    seen = range(1, plan.n_train_max + 1)
    beyond = range(plan.n_train_max + 1, plan.n_eval_max + 1)
    largest = [float(r.largest_correct_n()) for r in runs]
    generalising = sum(n > plan.n_train_max for n in largest)
    return (
        cell,
        str(runs[0].parameters),
        mean_std([r.fraction_right(seen) for r in runs]),
        mean_std([r.fraction_right(beyond) for r in runs]),
        mean_std(largest),
        f"{generalising}/{len(runs)}",
        mean_std([r.wall_time_s for r in runs]),
    )


def _curves(by_cell: dict[str, list[Run]], ns: range) -> dict[str, list[float]]:
    """For each cell, the fraction of seeds whose model is right at each n."""
    return {
        cell: [statistics.fmean(r.accepted[n] for r in runs) for n in ns]
        for cell, runs in by_cell.items()
    }


Results = dict[str, dict[str, list[Run]]]  # {language: {cell: one Run per seed}}


def train_all(plan: Plan, options: StudyOptions) -> Results:
    """Train and score every cell with every seed on both languages."""
    keys = [
        (lang, cell, seed) for lang in LANGUAGES for cell in CELLS for seed in options.seed_list
    ]
    with tempfile.TemporaryDirectory(prefix="counting-") as workdir:
        calls = [(*key, plan, Path(workdir)) for key in keys]
        runs = run_all(train_one, calls, options.jobs)
    results: Results = {lang: {cell: [] for cell in CELLS} for lang in LANGUAGES}
    for (language, cell, _), result in zip(keys, runs, strict=True):
        results[language][cell].append(result)
    return results


def _figure(path: Path, results: Results, plan: Plan, seeds: int) -> None:
    ns = range(1, plan.n_eval_max + 1)
    panels = [
        CurvePanel(
            title=symbol,
            x=list(ns),
            curves=_curves(results[language], ns),
            marker_x=plan.n_train_max + 0.5,
            marker_label="end of training range",
        )
        for language, symbol in LANGUAGES.items()
    ]
    title = f"Fraction of {seeds} seed(s) right at each n (trained on n <= {plan.n_train_max})"
    curve_figure(path, title, panels, ylabel="fraction of seeds right")


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    results = train_all(plan, options)
    figure = "counting.png"
    _figure(options.out / figure, results, plan, options.seeds)
    tables = [
        Table(
            title=f"{symbol}: trained on n = 1..{plan.n_train_max}, scored on n = 1.."
            f"{plan.n_eval_max}",
            caption="Fractions of the strings n that are right, the largest n up to which every "
            "string is right, and how many seeds got past the training range.",
            columns=COLUMNS,
            rows=tuple(_row(cell, runs, plan) for cell, runs in results[language].items()),
        )
        for language, symbol in LANGUAGES.items()
    ]
    return Report(
        study="counting",
        title="Counting: aⁿbⁿ and aⁿbⁿcⁿ past the training range",
        description=_description(plan, options),
        tables=tables,
        figures=[(figure, "Accuracy against n per cell; the dotted line ends the training range.")],
        notes=[
            "A string is right when every next-symbol prediction (sigmoid > 0.5 per symbol) equals "
            "the set of allowed next symbols; this implies correct rejection of every wrong "
            "continuation.",
            "'seeds past training n': seeds whose largest all-right n exceeds the training range.",
        ],
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        f"One layer of {plan.hidden_size} units per cell, trained with Adam (lr {plan.lr}, batch "
        f"{plan.batch_size}, at most {plan.epochs} epochs, early stopping after {plan.patience} "
        f"epochs without a better validation loss on n = 1..{plan.n_train_max}), then scored on "
        f"every n = 1..{plan.n_eval_max}. {options.seeds} seed(s) per cell; tables show mean ± std "
        "over seeds. The figure of merit is 'largest n all right' (Weiss, Goldberg & Yahav 2018)."
    )
