"""The adding problem (Hochreiter & Schmidhuber 1997), generated from the seed.

Each step has two channels: a value drawn uniformly from [0, 1] and a marker that is 1 at exactly
two steps (one in each half of the sequence) and 0 elsewhere. The target, scored at the last step
only, is the sum of the two marked values. Always answering 1.0 scores an MSE of 1/6 (about 0.167),
the variance of the sum: a model has learnt something only below that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.model import RecurrentModel
from training.tasks.base import (
    Normalization,
    SequenceSplit,
    Task,
    TaskOptions,
    fit_stats,
    predict,
    valid_steps,
)

CONSTANT_GUESS = 1.0  # the best constant answer: the mean of the sum


def adding_split(count: int, steps: int, rng: np.random.Generator) -> SequenceSplit:
    """``count`` sequences of ``steps`` steps; the target sits at the last step."""
    values = rng.uniform(0.0, 1.0, size=(count, steps)).astype(np.float32)  # (N, T)
    half = steps // 2
    first = rng.integers(0, half, size=count)  # (N,)
    second = rng.integers(half, steps, size=count)  # (N,)
    rows = np.arange(count)
    markers = np.zeros((count, steps), np.float32)  # (N, T)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = np.zeros((count, steps, 1), np.float32)  # (N, T, 1)
    y[:, -1, 0] = values[rows, first] + values[rows, second]
    weight = np.zeros((count, steps), np.float32)  # (N, T)
    weight[:, -1] = 1.0
    return SequenceSplit(
        x=np.stack([values, markers], axis=-1),  # (N, T, 2)
        y=y,
        weight=weight,
        lengths=np.full(count, steps, dtype=np.int64),
    )


@dataclass
class AddingTask(Task):
    """See the module docstring."""

    def evaluate(self, model: RecurrentModel, split: SequenceSplit) -> dict[str, float]:
        scored = split.weight > 0  # (N, T)
        predicted = predict(model, split)[scored].astype(np.float64)  # (N, 1)
        target = split.y[scored].astype(np.float64)
        return {
            "mse": float(np.mean((predicted - target) ** 2)),
            "baseline_mse": float(np.mean((CONSTANT_GUESS - target) ** 2)),
        }


def adding_task(options: TaskOptions) -> AddingTask:
    rng = np.random.default_rng(options.seed)
    steps = options.seq_len
    train = adding_split(options.train_size, steps, rng)
    input_mean, input_std = fit_stats(train.x, valid_steps(train.lengths, steps))
    output_mean, output_std = fit_stats(train.y, train.weight)
    return AddingTask(
        name="adding",
        description=(
            f"Adding problem: sum the two marked values of a {steps}-step sequence "
            "(scored at the last step)"
        ),
        head="regression",
        feature_names=("value", "marker"),
        output_names=("sum",),
        train=train,
        validation=adding_split(options.eval_size, steps, rng),
        test=adding_split(options.eval_size, steps, rng),
        normalization=Normalization(input_mean, input_std, output_mean, output_std),
        options={
            "seq_len": steps,
            "train_size": options.train_size,
            "eval_size": options.eval_size,
            "seed": options.seed,
        },
    )
