"""Study ``classification``: sequence classification as in the gate-variant papers.

Dey & Salem (2017) and Heck & Salem (2017) compared the GRU and MGU variants on MNIST read row by
row and pixel by pixel. This study does the same with scikit-learn's bundled 8x8 digits
(:mod:`training.tasks.digits`): 8 steps of 8 pixels, and 64 steps of one pixel. Every cell gets the
hidden size whose recurrent parameter count is nearest the LSTM's at ``reference_hidden`` units
(:func:`training.experiments.budget.matched_sizes`), so the comparison is at matched parameters.

The class is read from the linear head at the last step (softmax cross-entropy). All seeds of a
cell train at once as a :class:`SeedEnsemble`; each seed draws its own shuffle every epoch and keeps
its lowest-validation-loss state (early stopping per seed, patience ``patience`` epochs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from training.cells import CELLS
from training.experiments.budget import matched_sizes
from training.experiments.ensemble import SeedEnsemble
from training.experiments.options import StudyOptions, run_grid
from training.experiments.plots import BarPanel, bar_figure
from training.experiments.report import Report, Table
from training.experiments.stats import mean_ci, p_text, t_interval, welch_p
from training.model import ModelConfig, RecurrentModel
from training.tasks.digits import (
    CLASSES,
    READINGS,
    LabelledSequences,
    Reading,
    load_digit_splits,
)

REFERENCE_CELL = "lstm"
REFERENCE_PAPERS: dict[str, str] = {
    "gru": "the papers' baseline",
    "gru-classic": "the papers' GRU equations (reset-before)",
    "gru1": "Dey & Salem: about as accurate as the GRU",
    "gru2": "Dey & Salem: about as accurate as the GRU",
    "gru3": "Dey & Salem: lags at some learning rates, most on long (pixel) sequences",
    "mgu": "Heck & Salem's baseline; Zhou et al.: comparable to the GRU",
    "mgu1": "Heck & Salem: similar to the MGU",
    "mgu2": "Heck & Salem: similar to the MGU, better on their data",
    "mgu3": "Heck & Salem: similar to the MGU",
    "lstm": "not in these papers",
}


@dataclass(frozen=True)
class Plan:
    reference_hidden: int  # the LSTM's hidden size; its parameter count is every cell's budget
    epochs: int  # at most
    patience: int  # a seed stops improving after this many epochs without a lower val loss
    batch_size: int
    lr: float  # Adam
    train_limit: int = 0  # use only this many training images (0: all; for the tiny form)


FULL = Plan(reference_hidden=16, epochs=100, patience=8, batch_size=64, lr=1e-2)
TINY = Plan(reference_hidden=3, epochs=2, patience=1, batch_size=32, lr=1e-2, train_limit=64)


@dataclass(frozen=True)
class Run:
    """One seed of one cell on one reading."""

    accuracy: float  # on the test images, with the lowest-validation-loss state
    best_epoch: int
    epochs_run: int
    wall_time_s: float  # of the whole ensemble


@dataclass
class CellResult:
    hidden: int
    parameters: int  # of the recurrent cell (the matched quantity)
    runs: list[Run] = field(default_factory=list)


def _seed_batch(data: LabelledSequences, rows: np.ndarray) -> tuple[Tensor, Tensor]:
    """``rows (S, B)``: each seed's images -> x ``(B, T, S, n)`` and labels ``(B, S)``."""
    x = torch.from_numpy(data.x[rows]).permute(1, 2, 0, 3)  # (B, T, S, n)
    return x.contiguous(), torch.from_numpy(data.label[rows]).T


def _last_logits(ensemble: SeedEnsemble, x: Tensor) -> Tensor:
    logits: Tensor = ensemble(x)
    return logits[:, -1]  # (B, S, classes)


def _seed_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """``(S,)`` the mean cross-entropy of each seed."""
    b, s, c = logits.shape
    losses = F.cross_entropy(logits.reshape(b * s, c), labels.reshape(-1), reduction="none")
    return losses.view(b, s).mean(dim=0)


@torch.no_grad()
def score(ensemble: SeedEnsemble, data: LabelledSequences) -> tuple[Tensor, Tensor]:
    """``(S,)`` loss and accuracy of every seed on every image of ``data``."""
    ensemble.eval()
    rows = np.tile(np.arange(len(data.label)), (ensemble.size, 1))  # (S, N)
    x, labels = _seed_batch(data, rows)
    logits = _last_logits(ensemble, x)
    correct = (logits.argmax(dim=-1) == labels).float().mean(dim=0)
    return _seed_losses(logits, labels), correct


class _Trainer:
    def __init__(self, cell: str, hidden: int, seeds: int, plan: Plan, input_size: int) -> None:
        self.plan = plan
        config = ModelConfig(cell, input_size, hidden, CLASSES, head="classification")
        self.ensemble = SeedEnsemble(config, range(seeds))
        self.optimizer = torch.optim.Adam(self.ensemble.parameters(), lr=plan.lr)
        self.rng = np.random.default_rng(seeds)
        self.best_loss = [float("inf")] * seeds
        self.best_epoch = [0] * seeds
        self.best_state: list[dict[str, Tensor]] = [{} for _ in range(seeds)]

    def epoch(self, train: LabelledSequences) -> None:
        self.ensemble.train()
        size = self.ensemble.size
        orders = np.stack([self.rng.permutation(len(train.label)) for _ in range(size)])
        for start in range(0, orders.shape[1], self.plan.batch_size):
            x, labels = _seed_batch(train, orders[:, start : start + self.plan.batch_size])
            loss = _seed_losses(_last_logits(self.ensemble, x), labels).sum()
            self.optimizer.zero_grad()
            torch.autograd.backward(loss)
            self.ensemble.clip_grad_norm_(1.0)
            self.optimizer.step()

    def keep(self, epoch: int, validation: LabelledSequences) -> bool:
        """Keep each seed's best state; True when every seed has stalled."""
        losses, _ = score(self.ensemble, validation)
        for i, loss in enumerate(losses.tolist()):
            if loss < self.best_loss[i]:
                self.best_loss[i], self.best_epoch[i] = loss, epoch
                self.best_state[i] = {
                    k: v.clone() for k, v in self.ensemble.member(i).state_dict().items()
                }
        return all(epoch - best >= self.plan.patience for best in self.best_epoch)

    def best_ensemble(self) -> SeedEnsemble:
        members = []
        for state in self.best_state:
            model = RecurrentModel(self.ensemble.member_config)
            model.load_state_dict(state)
            members.append(model)
        self.ensemble.load_members(members)
        return self.ensemble


def train_one(reading: Reading, cell: str, hidden: int, seeds: int, plan: Plan) -> CellResult:
    """Train all seeds of one cell on one reading; score each on the test images."""
    torch.set_num_threads(1)
    splits = load_digit_splits(reading)
    train = splits.train
    if plan.train_limit:
        train = LabelledSequences(train.x[: plan.train_limit], train.label[: plan.train_limit])
    started = time.perf_counter()
    trainer = _Trainer(cell, hidden, seeds, plan, train.x.shape[-1])
    epochs_run = plan.epochs
    for epoch in range(1, plan.epochs + 1):
        trainer.epoch(train)
        if trainer.keep(epoch, splits.validation):
            epochs_run = epoch
            break
    wall_time = time.perf_counter() - started
    _, accuracy = score(trainer.best_ensemble(), splits.test)
    result = CellResult(hidden, CELLS[cell].parameter_count(train.x.shape[-1], hidden))
    for i, value in enumerate(accuracy.tolist()):
        result.runs.append(Run(value, trainer.best_epoch[i], epochs_run, wall_time))
    return result


Results = dict[str, dict[str, CellResult]]  # {reading: {cell: result}}


def train_all(plan: Plan, options: StudyOptions) -> Results:
    sizes = {
        reading: matched_sizes(_input_size(reading), REFERENCE_CELL, plan.reference_hidden)
        for reading in READINGS
    }

    def call(reading: str, cell: str) -> tuple[object, ...]:
        return reading, cell, sizes[reading][cell], options.seeds, plan

    return run_grid(train_one, READINGS, call, options.jobs)


def _input_size(reading: str) -> int:
    return 8 if reading == "rows" else 1


COLUMNS = (
    "cell",
    "hidden",
    "parameters (cell)",
    "test accuracy",
    "per seed",
    "p vs gru",
    "best epoch (median)",
    "train s (all seeds)",
    "what the papers report",
)


def _row(cell: str, result: CellResult, gru: CellResult) -> tuple[str, ...]:
    accuracy = [r.accuracy for r in result.runs]
    return (
        cell,
        str(result.hidden),
        str(result.parameters),
        mean_ci(accuracy),
        ", ".join(f"{a:.3f}" for a in accuracy),
        "—" if cell == "gru" else p_text(welch_p(accuracy, [r.accuracy for r in gru.runs])),
        f"{int(np.median([r.best_epoch for r in result.runs]))}",
        f"{result.runs[0].wall_time_s:.0f}",
        REFERENCE_PAPERS[cell],
    )


def _figure(path: Path, results: Results) -> None:
    series = {
        reading: {
            cell: (
                t_interval([r.accuracy for r in res.runs]).mean,
                _half([r.accuracy for r in res.runs]),
            )
            for cell, res in by_cell.items()
        }
        for reading, by_cell in results.items()
    }
    bar_figure(
        path,
        "Test accuracy on the 8x8 digits (mean and 95% t-interval over seeds)",
        [BarPanel("test accuracy", {f"read by {k}": v for k, v in series.items()})],
    )


def _half(values: list[float]) -> float:
    half = t_interval(values).half_width
    return 0.0 if np.isnan(half) else half


def run(options: StudyOptions) -> Report:
    plan = TINY if options.tiny else FULL
    results = train_all(plan, options)
    _figure(options.out / "classification.png", results)
    tables = [
        Table(
            title=f"Read by {reading}: {_steps(reading)}",
            caption=_caption(),
            columns=COLUMNS,
            rows=tuple(_row(cell, result, by_cell["gru"]) for cell, result in by_cell.items()),
        )
        for reading, by_cell in results.items()
    ]
    return Report(
        study="classification",
        title="Sequence classification: the 8x8 digits read row by row and pixel by pixel",
        description=_description(plan, options),
        tables=tables,
        figures=[
            (
                "classification.png",
                "Test accuracy per cell, both readings; the error bars "
                "are 95% t-intervals over seeds.",
            )
        ],
        notes=[
            "The 8x8 digits are far smaller than MNIST (64 pixels, 1,797 images): the sequences "
            "are 8 and 64 steps, against 28 and 784 in the papers. Read the direction of the "
            "differences, not their size.",
            "The split is fixed (seed 0, stratified); seeds vary the initial weights and the "
            "shuffles. Accuracies are over 270 test images, so one image is 0.0037.",
        ],
    )


def _steps(reading: str) -> str:
    return "8 steps of 8 pixels" if reading == "rows" else "64 steps of one pixel"


def _caption() -> str:
    return (
        "Test accuracy with the lowest-validation-loss state, mean ± 95% t-interval over seeds; "
        "'p vs gru' is Welch's t-test against the GRU. 'What the papers report' is the "
        "direction the papers' abstracts and results state for MNIST."
    )


def _description(plan: Plan, options: StudyOptions) -> str:
    return (
        "scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled to [0, 1], split by "
        "class 70/15/15 (1,257 training, 270 validation, 270 test images). One layer per cell "
        f"at the hidden size whose parameter count is nearest the {REFERENCE_CELL}'s with "
        f"{plan.reference_hidden} units (matched for each reading), a linear head read at the "
        f"last step, softmax cross-entropy. Adam (lr {plan.lr}, batch {plan.batch_size}, "
        f"gradient norm clipped at 1 per seed), at most {plan.epochs} epochs, each seed keeps "
        f"its lowest-validation-loss state and stops after {plan.patience} epochs without one. "
        f"{options.seeds} seeds per cell, trained together as a block-diagonal ensemble of the "
        "project's cells (each seed as if alone, with its own shuffles)."
    )
