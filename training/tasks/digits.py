"""The 8x8 handwritten digits bundled with scikit-learn, read as sequences.

The gate-variant papers (Dey & Salem 2017; Heck & Salem 2017) read MNIST row by row (28 steps of
28 pixels) and pixel by pixel (784 steps of one pixel). Here the same two readings of
``sklearn.datasets.load_digits`` (1,797 images, shipped inside the package, so nothing downloads):

- ``rows``: 8 steps of 8 pixels;
- ``pixels``: 64 steps of one pixel, row after row.

Pixel values (0..16) are scaled to [0, 1]. The split is stratified by class, 70/15/15, and fixed
by ``split_seed`` so that every seed of every cell is scored on the same test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

READINGS = ("rows", "pixels")
Reading = Literal["rows", "pixels"]
SPLIT_FRACTIONS = (0.70, 0.15)  # train and validation; the test part is the rest
CLASSES = 10


@dataclass(frozen=True)
class LabelledSequences:
    """Images as sequences and their classes."""

    x: np.ndarray  # (N, T, n) float32 in [0, 1]
    label: np.ndarray  # (N,) int64 in 0..9


@dataclass(frozen=True)
class DigitSplits:
    train: LabelledSequences
    validation: LabelledSequences
    test: LabelledSequences


def as_sequences(images: np.ndarray, reading: Reading) -> np.ndarray:
    """``(N, 8, 8)`` images as ``(N, 8, 8)`` rows or ``(N, 64, 1)`` pixels, scaled to [0, 1]."""
    scaled = (images / 16.0).astype(np.float32)  # (N, 8, 8)
    if reading == "rows":
        return scaled
    if reading == "pixels":
        return scaled.reshape(len(images), -1, 1)
    raise ValueError(f"unknown reading {reading!r}; choose one of {', '.join(READINGS)}")


def stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Indices of train, validation and test: each class cut 70/15/15 after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut_train = round(len(members) * SPLIT_FRACTIONS[0])
        cut_val = round(len(members) * sum(SPLIT_FRACTIONS))
        for part, chunk in zip(parts, np.split(members, [cut_train, cut_val]), strict=True):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(part)) for part in parts)


def load_digit_splits(reading: Reading, split_seed: int = 0) -> DigitSplits:
    """The bundled digits read as ``reading``, split by class 70/15/15."""
    from sklearn.datasets import load_digits  # a slow import, only here

    digits = load_digits()
    x = as_sequences(digits.images, reading)
    labels = digits.target.astype(np.int64)
    train, validation, test = (
        LabelledSequences(x[rows], labels[rows]) for rows in stratified_split(labels, split_seed)
    )
    return DigitSplits(train, validation, test)
