"""What every task provides: padded sequence splits, train-only normalisation, its own metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.model import HeadKind, RecurrentModel

SPLITS = ("train", "validation", "test")


class TaskError(ValueError):
    """A task that cannot be built from the options given; the message says what to fix."""


@dataclass(frozen=True)
class TaskOptions:
    """Every task option; each task reads the ones it needs and records them in its checkpoint."""

    seed: int = 0  # seeds every random choice a task makes (windows, generated sequences)
    # series forecasting (csv, co2)
    csv: Path | None = None  # the user's CSV file (csv task)
    features: tuple[str, ...] = ()  # input columns; empty means the target column alone
    target: str | None = None  # the column to forecast
    horizon: int = 1  # features at row t predict the target at row t + horizon
    difference: bool = False  # forecast changes: inputs and target are first differences
    train_windows: int = 256  # random training windows drawn from the train part
    # adding problem
    seq_len: int = 50  # steps per sequence
    train_size: int = 4000  # training sequences
    eval_size: int = 1000  # validation sequences, and as many test sequences
    # counting languages
    n_train_max: int = 20  # train and validate on n = 1..n_train_max
    n_test_max: int = 60  # test on n = n_train_max + 1..n_test_max

    def __post_init__(self) -> None:
        for name in ("horizon", "train_windows", "train_size", "eval_size"):
            if getattr(self, name) < 1:
                raise TaskError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TaskError(f"seq_len must be >= 2 (two marked steps), got {self.seq_len}")
        if self.n_train_max < 1:
            raise TaskError(f"n_train_max must be >= 1, got {self.n_train_max}")
        if self.n_test_max <= self.n_train_max:
            raise TaskError(
                f"n_test_max ({self.n_test_max}) must be larger than n_train_max "
                f"({self.n_train_max}) so that the test range is held out"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskOptions:
        """Rebuild options saved by :meth:`Task.options` (JSON-friendly types back to ours)."""
        values = dict(data)
        if values.get("csv") is not None:
            values["csv"] = Path(values["csv"])
        if "features" in values:
            values["features"] = tuple(values["features"])
        return cls(**values)


@dataclass(frozen=True)
class SequenceSplit:
    """A batch of padded sequences. ``weight`` is 0 at padding and at steps that are not scored."""

    x: np.ndarray  # (N, T, n) float32, raw features
    y: np.ndarray  # (N, T, o) float32, raw targets
    weight: np.ndarray  # (N, T) float32, loss weight of each step
    lengths: np.ndarray  # (N,) int64, valid steps of each row

    def __post_init__(self) -> None:
        n, t = self.x.shape[:2]
        if self.y.shape[:2] != (n, t) or self.weight.shape != (n, t) or self.lengths.shape != (n,):
            raise ValueError("SequenceSplit arrays disagree on batch or time size")

    @property
    def size(self) -> dict[str, int]:
        """Sequences, valid steps and scored steps, for summaries."""
        return {
            "sequences": int(self.x.shape[0]),
            "steps": int(self.lengths.sum()),
            "scored_steps": int((self.weight > 0).sum()),
        }


@dataclass(frozen=True)
class Normalization:
    """Per-feature and per-output mean and std fitted on the training split only.

    Empty tuples mean "no normalisation" (one-hot inputs, logit outputs).
    """

    input_mean: tuple[float, ...] = ()
    input_std: tuple[float, ...] = ()
    output_mean: tuple[float, ...] = ()
    output_std: tuple[float, ...] = ()


def fit_stats(
    values: np.ndarray, weight: np.ndarray
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of ``values (N, T, k)`` over the steps where ``weight (N, T)`` is positive.

    A constant column gets std 1 so that normalising it stays finite.
    """
    picked = values[weight > 0].astype(np.float64)  # (S, k)
    mean = picked.mean(axis=0)
    std = picked.std(axis=0)
    std[std < 1e-8] = 1.0
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def valid_steps(lengths: np.ndarray, steps: int) -> np.ndarray:
    """``(N, T)`` float32 mask, 1 where the step is within the row's length."""
    return (np.arange(steps)[None, :] < lengths[:, None]).astype(np.float32)


@torch.no_grad()
def predict(model: RecurrentModel, split: SequenceSplit, batch_size: int = 256) -> np.ndarray:
    """The model's raw outputs ``(N, T, o)`` on a split (state starting at zero for every row)."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, split.x.shape[0], batch_size):
        x = torch.from_numpy(split.x[start : start + batch_size]).to(device)  # (B, T, n)
        lengths = torch.from_numpy(split.lengths[start : start + batch_size]).to(device)  # (B,)
        y, _ = model(x, lengths)  # (B, T, o)
        outputs.append(y.cpu().numpy())
    return np.concatenate(outputs)


@dataclass
class Task(ABC):
    """A learning problem: three splits, how to score a model on one, and what to call things."""

    name: str
    description: str
    head: HeadKind
    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    train: SequenceSplit
    validation: SequenceSplit
    test: SequenceSplit
    normalization: Normalization
    options: dict[str, Any] = field(default_factory=dict)  # what rebuilds the task (JSON types)

    @property
    def input_size(self) -> int:
        return len(self.feature_names)

    @property
    def output_size(self) -> int:
        return len(self.output_names)

    def split(self, name: str) -> SequenceSplit:
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        split: SequenceSplit = getattr(self, name)
        return split

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the task: names, description and its options."""
        return {
            "name": self.name,
            "description": self.description,
            "feature_names": list(self.feature_names),
            "output_names": list(self.output_names),
            **self.options,
        }

    def data_sizes(self) -> dict[str, dict[str, int]]:
        return {name: self.split(name).size for name in SPLITS}

    @abstractmethod
    def evaluate(self, model: RecurrentModel, split: SequenceSplit) -> dict[str, float]:
        """Metrics of ``model`` on ``split``, on the raw scale of the data."""
