"""Where the streamed observations come from: a CSV file or standard input, one row per step.

Every mistake in the input names the line (and, for a CSV file, the column) so that it can be
fixed without guessing. Rows are produced lazily so that standard input can be streamed live.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

Row = list[float]


class ClientError(Exception):
    """A problem the streaming client reports as one line before exiting with a non-zero status."""


class SeriesError(ClientError):
    """The input series cannot be read: a missing file, an unknown column or a bad value."""


def parse_value(text: str, where: str) -> float:
    """One finite number; ``where`` says which line and column it came from."""
    stripped = text.strip()
    if not stripped:
        raise SeriesError(f"{where}: missing value")
    try:
        value = float(stripped)
    except ValueError:
        raise SeriesError(f"{where}: {stripped!r} is not a number") from None
    if not math.isfinite(value):
        raise SeriesError(f"{where}: {stripped!r} is not a finite number")
    return value


def _column_indices(path: Path, header: Sequence[str], columns: Sequence[str]) -> list[int]:
    names = [name.strip() for name in header]
    indices = []
    for column in columns:
        if column not in names:
            available = ", ".join(repr(name) for name in names)
            raise SeriesError(f"{path}: no column {column!r}; the header has {available}")
        indices.append(names.index(column))
    return indices


def read_csv_rows(path: Path, columns: Sequence[str]) -> list[Row]:
    """The named columns of a CSV file with a header line, as one row of floats per line.

    Blank lines are skipped; line numbers in errors count the header as line 1.
    """
    if not columns:
        raise SeriesError("name at least one column to stream")
    try:
        with path.open(newline="") as handle:
            return _read_csv(path, handle, columns)
    except OSError as exc:
        raise SeriesError(f"cannot read {path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise SeriesError(f"{path}: malformed CSV: {exc}") from None


def _read_csv(path: Path, handle: TextIO, columns: Sequence[str]) -> list[Row]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        raise SeriesError(f"{path} is empty; expected a header line naming the columns")
    indices = _column_indices(path, header, columns)
    rows = []
    for record in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        row = []
        for column, index in zip(columns, indices, strict=True):
            where = f"{path} line {line}, column {column!r}"
            if index >= len(record):
                raise SeriesError(f"{where}: missing value (the line has {len(record)} fields)")
            row.append(parse_value(record[index], where))
        rows.append(row)
    if not rows:
        raise SeriesError(f"{path} has a header but no data lines")
    return rows


def iter_text_rows(stream: TextIO, name: str = "stdin") -> Iterator[Row]:
    """Rows from a text stream, one step per line, features separated by commas or spaces.

    Blank lines and lines starting with ``#`` are skipped. Rows are yielded as they are read.
    """
    width = None
    for line_number, line in enumerate(stream, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.replace(",", " ").split()
        row = [parse_value(field, f"{name} line {line_number}") for field in fields]
        if width is not None and len(row) != width:
            raise SeriesError(
                f"{name} line {line_number}: {len(row)} values, earlier lines had {width}"
            )
        width = len(row)
        yield row
