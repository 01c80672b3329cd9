"""Series forecasting (the ``csv`` and ``co2`` tasks): features at step t predict the target later.

The data is split by time, 70/15/15, on the row of each *target*, so that nothing the model trains
on (inputs or targets) comes from a row at or after the first validation target. The model trains on
random windows of the train part. Validation and test are scored the way the model is used when
streaming: it runs over the series from the first step with its state carried, and only the
validation (or test) positions count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from training.model import RecurrentModel
from training.tasks.base import (
    Normalization,
    SequenceSplit,
    Task,
    TaskError,
    TaskOptions,
    fit_stats,
    predict,
    valid_steps,
)
from training.tasks.csvfile import read_columns

SPLIT_FRACTIONS = (0.70, 0.15)  # train and validation; the test part is the rest
WINDOW_STEPS = (64, 104)  # shortest and longest random training window
MIN_POSITIONS = 20  # fewer usable rows than this cannot make three meaningful parts


@dataclass(frozen=True)
class Series:
    """Forecasting positions: ``x[t]`` predicts ``y[t]``, the value at row ``target_row[t]``."""

    x: np.ndarray  # (M, n) inputs
    y: np.ndarray  # (M, 1) targets
    persistence: np.ndarray  # (M, 1) what "nothing changes" predicts for each target
    target_row: np.ndarray  # (M,) row index of each target in the source data


@dataclass
class SeriesTask(Task):
    """A forecasting task over one long series; see the module docstring."""

    persistence: np.ndarray | None = None  # (M, 1), aligned with the validation/test steps

    def evaluate(self, model: RecurrentModel, split: SequenceSplit) -> dict[str, float]:
        scored = split.weight > 0  # (N, T)
        predicted = predict(model, split)[scored]  # (S, 1)
        target = split.y[scored]
        metrics = _errors(predicted, target, prefix="")
        if self.persistence is not None and split.x.shape[0] == 1:
            baseline = self.persistence[None, : split.x.shape[1]][scored]  # (S, 1)
            metrics |= _errors(baseline, target, prefix="persistence_")
            metrics["skill"] = 1.0 - metrics["rmse"] / max(metrics["persistence_rmse"], 1e-12)
        metrics["positions"] = float(scored.sum())
        return metrics


def _errors(predicted: np.ndarray, target: np.ndarray, prefix: str) -> dict[str, float]:
    error = (predicted - target).astype(np.float64)
    return {
        f"{prefix}rmse": float(np.sqrt(np.mean(error**2))),
        f"{prefix}mae": float(np.mean(np.abs(error))),
    }


def make_series(
    columns: dict[str, np.ndarray],
    features: tuple[str, ...],
    target: str,
    horizon: int,
    difference: bool,
) -> Series:
    """Turn aligned columns into forecasting positions (see :class:`Series`)."""
    inputs = np.stack([columns[name] for name in features], axis=1)  # (R, n)
    level = columns[target]  # (R,)
    rows = len(level)
    first = 1 if difference else 0  # a difference needs the previous row
    t = np.arange(first, rows - horizon)  # positions: rows whose target exists
    if difference:
        x = inputs[t] - inputs[t - 1]
        y = level[t + horizon] - level[t]
        persistence = np.zeros_like(y)
    else:
        x, y, persistence = inputs[t], level[t + horizon], level[t]
    return Series(x=x, y=y[:, None], persistence=persistence[:, None], target_row=t + horizon)


def split_positions(series: Series, rows: int, source: str) -> tuple[int, int]:
    """Where validation and test positions start, cutting the source rows 70/15/15 by time."""
    train_rows = round(rows * SPLIT_FRACTIONS[0])
    val_rows = round(rows * sum(SPLIT_FRACTIONS))
    val_start = int(np.searchsorted(series.target_row, train_rows))
    test_start = int(np.searchsorted(series.target_row, val_rows))
    total = len(series.target_row)
    if total < MIN_POSITIONS or min(val_start, test_start - val_start, total - test_start) < 1:
        raise TaskError(
            f"{source} has {rows} data rows, too few for a 70/15/15 split by time: at least "
            f"{MIN_POSITIONS} usable rows are needed after the horizon (found {max(total, 0)})"
        )
    return val_start, test_start


def _sequence(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> SequenceSplit:
    """One row holding the series from its first position: the streaming view."""
    steps = len(x)
    return SequenceSplit(
        x=x[None].astype(np.float32),
        y=y[None].astype(np.float32),
        weight=weight[None].astype(np.float32),
        lengths=np.array([steps], dtype=np.int64),
    )


def _windows(x: np.ndarray, y: np.ndarray, count: int, seed: int) -> SequenceSplit:
    """``count`` random windows of the train part, padded to the longest possible window."""
    rng = np.random.default_rng(seed)
    longest = min(WINDOW_STEPS[1], len(x))
    shortest = min(WINDOW_STEPS[0], longest)
    lengths = rng.integers(shortest, longest + 1, size=count)  # (N,)
    starts = rng.integers(0, len(x) - lengths + 1)  # (N,)
    xs = np.zeros((count, longest, x.shape[1]), np.float32)  # (N, T, n)
    ys = np.zeros((count, longest, 1), np.float32)  # (N, T, 1)
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        xs[i, :length] = x[start : start + length]
        ys[i, :length] = y[start : start + length]
    lengths = lengths.astype(np.int64)
    return SequenceSplit(x=xs, y=ys, weight=valid_steps(lengths, longest), lengths=lengths)


def series_task(
    name: str,
    description: str,
    columns: dict[str, np.ndarray],
    options: TaskOptions,
    source: str,
    saved_options: dict[str, Any],
) -> SeriesTask:
    """The shared code path of every forecasting task (``csv`` and ``co2``)."""
    assert options.target is not None
    features = options.features or (options.target,)
    series = make_series(columns, features, options.target, options.horizon, options.difference)
    val_start, test_start = split_positions(series, len(columns[options.target]), source)
    train = _windows(
        series.x[:val_start], series.y[:val_start], options.train_windows, options.seed
    )
    in_val = np.arange(test_start) >= val_start
    in_test = np.arange(len(series.x)) >= test_start
    input_mean, input_std = fit_stats(series.x[None, :val_start], np.ones((1, val_start)))
    output_mean, output_std = fit_stats(series.y[None, :val_start], np.ones((1, val_start)))
    suffix = "_change" if options.difference else ""
    step = "next" if options.horizon == 1 else f"plus_{options.horizon}"
    return SeriesTask(
        name=name,
        description=description,
        head="regression",
        feature_names=tuple(f"{f}{suffix}" for f in features),
        output_names=(f"{options.target}{suffix}_{step}",),
        train=train,
        validation=_sequence(series.x[:test_start], series.y[:test_start], in_val),
        test=_sequence(series.x, series.y, in_test),
        normalization=Normalization(input_mean, input_std, output_mean, output_std),
        options=saved_options,
        persistence=series.persistence,
    )


def _series_options(options: TaskOptions) -> dict[str, Any]:
    return {
        "features": list(options.features),
        "target": options.target,
        "horizon": options.horizon,
        "difference": options.difference,
        "train_windows": options.train_windows,
        "seed": options.seed,
    }


def csv_task(options: TaskOptions) -> SeriesTask:
    """The user's own series: ``--csv FILE --features a,b --target c [--horizon 1]``."""
    if options.csv is None:
        raise TaskError("the csv task needs --csv FILE")
    if not options.target:
        raise TaskError("the csv task needs --target COLUMN (the column to forecast)")
    wanted = tuple(dict.fromkeys((*options.features, options.target)))
    columns = read_columns(options.csv, wanted)
    what = "changes of " if options.difference else ""
    description = (
        f"Forecast {what}{options.target!r} {options.horizon} row(s) ahead from "
        f"{', '.join(options.features or (options.target,))} ({options.csv.name})"
    )
    saved = {"csv": str(options.csv), **_series_options(options)}
    return series_task("csv", description, columns, options, options.csv.name, saved)


def load_co2() -> np.ndarray:
    """Weekly Mauna Loa CO2 (ppm, 1958-2001, 2,284 values), gaps filled by time interpolation."""
    from statsmodels.datasets import co2  # a slow import, only for this task

    frame = co2.load_pandas().data
    values: np.ndarray = frame["co2"].interpolate(method="time").to_numpy(dtype=np.float64)
    return values


def bundled_task(name: str, values: np.ndarray, options: TaskOptions, what: str) -> SeriesTask:
    """A one-column series that ships inside a package: the column, the target and the task are
    all called ``name``; ``what`` says where the data comes from and at which step."""
    if options.csv is not None or options.features not in ((), (name,)):
        raise TaskError(
            f"the {name} task has one column, {name!r}; --csv and --features are for csv"
        )
    if options.target not in (None, name):
        raise TaskError(f"the {name} task forecasts {name!r}, not {options.target!r}")
    options = replace(options, features=(name,), target=name)
    step, unit = what.rsplit(" ", 1)[-1], "change" if options.difference else "value"
    description = f"{what}: forecast the {unit} {options.horizon} {step}(s) ahead"
    saved = _series_options(options)
    return series_task(name, description, {name: values}, options, name, saved)


def co2_task(options: TaskOptions) -> SeriesTask:
    """Next-week forecasting of the Mauna Loa CO2 series (statsmodels.datasets.co2)."""
    what = "Mauna Loa weekly CO2 (ppm, statsmodels.datasets.co2), by week"
    return bundled_task("co2", load_co2(), options, what)


def load_sunspots() -> np.ndarray:
    """Yearly mean sunspot numbers, 1700-2008 (309 values, statsmodels.datasets.sunspots)."""
    from statsmodels.datasets import sunspots  # a slow import, only for this task

    frame = sunspots.load_pandas().data
    values: np.ndarray = frame["SUNACTIVITY"].to_numpy(dtype=np.float64)
    return values


def sunspots_task(options: TaskOptions) -> SeriesTask:
    """Next-year forecasting of the yearly sunspot numbers (statsmodels.datasets.sunspots).

    A classic nonlinear series: the cycles rise faster than they fall and vary in height, which
    linear autoregressions miss (Tong & Lim 1980 fitted threshold models to it).
    """
    what = "Yearly sunspot numbers 1700-2008 (statsmodels.datasets.sunspots), by year"
    return bundled_task("sunspots", load_sunspots(), options, what)
