"""Linear forecasting baselines, fitted on the training part of a series task, scored like a cell.

Each baseline predicts the task's target ``y[t]`` (the next value, or the next change with
``--difference``) from what is known at position ``t``: the task's inputs up to ``t`` and the time
of year (or of the cycle). They are fitted by least squares on the training positions only (the
same positions the cells train on); the autoregressive order is chosen on the validation positions.
Scoring uses exactly the validation and test positions the cells are scored on.

- persistence: the task's own "nothing changes" forecast;
- climatology: the training mean of the target in the same season bin (one bin: the mean);
- harmonics: ``a + sum_k b_k cos(2 pi k phase) + c_k sin(2 pi k phase)``;
- AR(p): ``a + sum_i phi_i x[t - i + 1]``, p from 1..``max_order`` by validation RMSE;
- AR(p) + harmonics: both sets of regressors in one least-squares fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.tasks import SeriesTask

Design = Callable[[int], np.ndarray]  # AR order -> (M, k) regressors, rows aligned with y


@dataclass(frozen=True)
class Seasons:
    """How a series' positions map to a cycle (a year of weeks, a sunspot cycle of years)."""

    period: float  # positions per cycle
    harmonics: int  # sine/cosine pairs in the harmonic regression
    bins: int  # season bins of the climatology (1: the training mean)


@dataclass(frozen=True)
class Positions:
    """A forecasting task's series flattened: inputs, targets and the parts, by position."""

    x: np.ndarray  # (M,) the input at each position
    y: np.ndarray  # (M,) the target at each position
    persistence: np.ndarray  # (M,)
    val_start: int
    test_start: int

    @classmethod
    def of(cls, task: SeriesTask) -> Positions:
        assert task.persistence is not None
        val_weight = task.validation.weight[0]
        return cls(
            x=task.test.x[0, :, 0].astype(np.float64),
            y=task.test.y[0, :, 0].astype(np.float64),
            persistence=task.persistence[:, 0].astype(np.float64),
            val_start=int(np.argmax(val_weight > 0)),
            test_start=len(val_weight),
        )

    def part(self, name: str) -> slice:
        return {
            "train": slice(0, self.val_start),
            "validation": slice(self.val_start, self.test_start),
            "test": slice(self.test_start, len(self.y)),
        }[name]


@dataclass(frozen=True)
class Baseline:
    name: str
    validation_rmse: float
    test_rmse: float
    parameters: int


def rmse(predicted: np.ndarray, target: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - target) ** 2)))


def harmonic_columns(rows: int, seasons: Seasons) -> np.ndarray:
    """``(rows, 2 K)`` cosines and sines of the first K harmonics of the cycle."""
    phase = 2 * np.pi * np.arange(rows) / seasons.period  # (M,)
    k = np.arange(1, seasons.harmonics + 1)
    return np.concatenate([np.cos(phase[:, None] * k), np.sin(phase[:, None] * k)], axis=1)


def lag_columns(x: np.ndarray, order: int) -> np.ndarray:
    """``(M, order)``: ``x[t], ..., x[t-order+1]``; the first value stands in before the start."""
    padded = np.concatenate([np.full(order, x[0]), x])
    return np.stack([padded[order - i : order - i + len(x)] for i in range(order)], axis=1)


def least_squares(design: np.ndarray, p: Positions) -> np.ndarray:
    """Predictions at every position from a fit (with intercept) on the training positions."""
    columns = np.concatenate([np.ones((len(design), 1)), design], axis=1)  # (M, k + 1)
    train = p.part("train")
    coefficients, *_ = np.linalg.lstsq(columns[train], p.y[train], rcond=None)
    predicted: np.ndarray = columns @ coefficients
    return predicted


def _scored(name: str, predicted: np.ndarray, p: Positions, parameters: int) -> Baseline:
    val, test = p.part("validation"), p.part("test")
    return Baseline(
        name, rmse(predicted[val], p.y[val]), rmse(predicted[test], p.y[test]), parameters
    )


def climatology(p: Positions, seasons: Seasons) -> np.ndarray:
    """The training mean of the target in each season bin, at every position."""
    bins = (np.arange(len(p.y)) % seasons.period / seasons.period * seasons.bins).astype(int)
    bins = np.minimum(bins, seasons.bins - 1)
    train = p.part("train")
    means = np.array([p.y[train][bins[train] == b].mean() for b in range(seasons.bins)])
    predicted: np.ndarray = means[bins]
    return predicted


def _best_order(p: Positions, design: Design, max_order: int) -> tuple[int, np.ndarray]:
    """The AR order with the lowest validation RMSE, and its predictions."""
    val = p.part("validation")
    fits = {order: least_squares(design(order), p) for order in range(1, max_order + 1)}
    order = min(fits, key=lambda k: rmse(fits[k][val], p.y[val]))
    return order, fits[order]


def baselines(task: SeriesTask, seasons: Seasons, max_order: int = 12) -> list[Baseline]:
    """Every baseline of the module docstring, scored on the task's validation and test parts."""
    p = Positions.of(task)
    harmonics = harmonic_columns(len(p.y), seasons)
    order, ar = _best_order(p, lambda k: lag_columns(p.x, k), max_order)
    both_order, both = _best_order(
        p, lambda k: np.concatenate([lag_columns(p.x, k), harmonics], axis=1), max_order
    )
    pairs = 2 * seasons.harmonics
    climate = "mean" if seasons.bins == 1 else f"climatology ({seasons.bins} season bins)"
    return [
        _scored("persistence", p.persistence, p, 0),
        _scored(climate, climatology(p, seasons), p, seasons.bins),
        _scored(f"harmonics (K = {seasons.harmonics})", least_squares(harmonics, p), p, pairs + 1),
        _scored(f"AR({order})", ar, p, order + 1),
        _scored(f"AR({both_order}) + harmonics", both, p, both_order + pairs + 1),
    ]
