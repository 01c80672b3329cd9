"""Checking decoded inputs: a chunk of steps (T, n) of finite float32, or a clear error.

Every protocol hands its decoded values here (REST and websocket JSON as nested lists, binary
protocols as float32 arrays), so every protocol gives the same messages. The common case, plain
numbers in range, takes a fast path; anything unusual takes the value-by-value path that names
the first problem.
"""

from __future__ import annotations

import math
import reprlib
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from service.engine.errors import BadRequest, ChunkTooLarge, InvalidInput

FloatArray = npt.NDArray[np.float32]
NUMBER_TYPES = frozenset({int, float})  # bool is not a number here, nor a numeric string
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT64_MAX = float(np.finfo(np.float64).max)
SMALL_MATRIX = 64  # values checked in Python below this size; numpy is faster above it
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 30, 30


def parse_chunk(raw: Any, where: str, n: int, max_steps: int, allow_flat: bool) -> FloatArray:
    """Turn decoded JSON into a chunk (T, n) of finite float32, or raise naming the problem.

    A flat list of numbers is one step when ``allow_flat``. A float32 array (from a binary
    protocol) is checked for its shape, length and values without a detour through lists.
    """
    if isinstance(raw, np.ndarray):
        return checked_array(raw, where, n, max_steps)
    if not isinstance(raw, list):
        raise InvalidInput(f"'{where}' must be a list of steps, each a list of {n} numbers")
    if not raw:
        raise InvalidInput(f"'{where}' is empty: send at least one step")
    if allow_flat and type(raw[0]) is not list and not any(isinstance(v, list) for v in raw):
        raw = [raw]
    if len(raw) > max_steps:
        raise ChunkTooLarge(f"'{where}'", len(raw), max_steps)
    return finite_matrix(raw, where, len(raw), n, row_name="step")


def checked_array(raw: npt.NDArray[Any], where: str, n: int, max_steps: int) -> FloatArray:
    """Check a decoded float32 array (steps, n): shape, length and finite values."""
    if raw.dtype != np.float32 or raw.ndim != 2 or raw.shape[1] != n or not len(raw):
        raise InvalidInput(
            f"'{where}' must be float32 of shape (steps >= 1, {n}), "
            f"got {raw.dtype} {tuple(raw.shape)}"
        )
    if len(raw) > max_steps:
        raise ChunkTooLarge(f"'{where}'", len(raw), max_steps)
    if np.isfinite(raw).all():  # the common case: one pass, no index arrays
        return raw
    t, j = np.argwhere(~np.isfinite(raw))[0]
    raise BadRequest(_not_finite(where, t, j, repr(float(raw[t, j]))))


def _short(value: Any) -> str:
    """A short repr, bounded in length and depth (a client may nest lists a thousand deep)."""
    return _SHORT.repr(value)


def finite_matrix(raw: Any, where: str, rows: int, cols: int, row_name: str = "row") -> FloatArray:
    """Check ``raw`` is ``rows`` lists of ``cols`` finite numbers; return it as float32."""
    matrix = _plain_float32_matrix(raw, rows, cols)
    if matrix is not None:
        return matrix
    return _checked_matrix(raw, where, rows, cols, row_name)


def _plain_float32_matrix(raw: Any, rows: int, cols: int) -> FloatArray | None:
    """The fast path: ``raw`` as float32 when it is plainly valid, else None.

    Plainly valid: ``rows`` lists of ``cols`` ints or floats, all within float32's range. Anything
    else (including values that only round into that range) takes ``_checked_matrix``, which
    finds and names the problem.
    """
    if type(raw) is not list or len(raw) != rows:
        return None
    for row in raw:
        if type(row) is not list or len(row) != cols or not NUMBER_TYPES.issuperset(map(type, row)):
            return None
    if rows * cols <= SMALL_MATRIX:
        return _small_float32_matrix(raw)
    try:
        matrix = np.array(raw, dtype=np.float64)  # (rows, cols)
    except OverflowError:  # an int beyond float64
        return None
    if not (np.abs(matrix) <= FLOAT32_MAX).all():
        return None
    return matrix.astype(np.float32)


def _small_float32_matrix(raw: list[list[int | float]]) -> FloatArray | None:
    """A few plain numbers as float32, or None if any may be beyond float32's range.

    The sum of absolute values is NaN, infinite or above the limit whenever one value is (a
    chunk of large but valid values may also fail the test: the slow path then accepts it).
    Each value is within float32's range, so converting it directly rounds as float64 then
    float32 does.
    """
    try:
        total = math.fsum(map(abs, chain.from_iterable(raw)))
    except OverflowError:  # an int beyond float64, or a sum beyond it
        return None
    if not total <= FLOAT32_MAX:
        return None
    return np.array(raw, dtype=np.float32)  # (rows, cols)


def _checked_matrix(raw: Any, where: str, rows: int, cols: int, row_name: str) -> FloatArray:
    """The slow path of ``finite_matrix``: check value by value and name the first problem."""
    if not isinstance(raw, list) or len(raw) != rows:
        raise InvalidInput(f"'{where}' must be a list of {rows} {row_name}s")
    for t, row in enumerate(raw):
        if not isinstance(row, list):
            raise InvalidInput(
                f"'{where}[{t}]' must be a list of {cols} numbers, got {_short(row)}"
            )
        if len(row) != cols:
            raise InvalidInput(
                f"'{where}[{t}]' has {len(row)} values; the model expects {cols} per {row_name}"
            )
        for j, value in enumerate(row):
            if type(value) not in (int, float):
                raise BadRequest(f"'{where}[{t}][{j}]' is not a number: {_short(value)}")
    try:
        matrix = np.asarray(raw, dtype=np.float64)
    except OverflowError:  # an int beyond float64 (JSON allows any number of digits)
        t, j = next(
            (t, j) for t, row in enumerate(raw) for j, v in enumerate(row) if abs(v) > FLOAT64_MAX
        )
        raise BadRequest(_not_finite(where, t, j, "an integer beyond float64")) from None
    with np.errstate(over="ignore"):
        as_float32 = matrix.astype(np.float32)
    bad = np.argwhere(~np.isfinite(as_float32))
    if bad.size:
        t, j = bad[0]
        raise BadRequest(_not_finite(where, t, j, repr(float(matrix[t, j]))))
    return as_float32


def _not_finite(where: str, t: int, j: int, value: str) -> str:
    return (
        f"'{where}[{t}][{j}]' is {value}: NaN, infinity and values beyond float32 are not accepted"
    )
