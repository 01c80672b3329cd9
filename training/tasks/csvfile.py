"""Reading the user's CSV file into numeric columns, with errors that name the file, row and column.

Row numbers are line numbers in the file as a spreadsheet shows them: the header is row 1, the first
data row is row 2.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from training.tasks.base import TaskError


class CsvError(TaskError):
    """An unusable CSV file; the message names the file and, where it applies, row and column."""


def read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named columns of ``path`` as float64 arrays, one value per data row."""
    header, rows = _read_rows(path)
    _check_header(path, header)
    missing = [c for c in columns if c not in header]
    if missing:
        raise CsvError(
            f"{path.name} has no column {missing[0]!r}; available columns: {', '.join(header)}"
        )
    if not rows:
        raise CsvError(f"{path.name} has a header but no data rows")
    index = {name: header.index(name) for name in columns}
    values = {name: np.empty(len(rows)) for name in columns}
    for i, (row_number, row) in enumerate(rows):
        if len(row) != len(header):
            raise CsvError(
                f"{path.name} row {row_number} has {len(row)} fields, the header has {len(header)}"
            )
        for name, k in index.items():
            values[name][i] = _parse_number(path, row_number, name, row[k])
    return values


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank data rows, each with its row number."""
    if not path.exists():
        raise CsvError(f"{path} does not exist")
    if not path.is_file():
        raise CsvError(f"{path} is not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            lines = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except OSError as exc:
        raise CsvError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CsvError(f"{path.name} is not a UTF-8 text file") from None
    except csv.Error as exc:
        raise CsvError(f"{path.name} is not a valid CSV file: {exc}") from None
    if not lines:
        raise CsvError(f"{path.name} is empty")
    header = [name.strip() for name in lines[0][1]]
    return header, lines[1:]


def _check_header(path: Path, header: list[str]) -> None:
    if all(_is_number(name) for name in header):
        raise CsvError(
            f"{path.name} has no header row: the first row must name the columns "
            f"(found {', '.join(header)})"
        )
    if any(not name for name in header):
        raise CsvError(f"{path.name} header has an empty column name: {header}")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise CsvError(f"{path.name} header names column {duplicates[0]!r} more than once")


def _parse_number(path: Path, row_number: int, column: str, text: str) -> float:
    text = text.strip()
    where = f"{path.name} row {row_number}, column {column!r}"
    if not text:
        raise CsvError(f"{where} is empty")
    try:
        value = float(text)
    except ValueError:
        raise CsvError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CsvError(f"{where}: {text!r} is not a finite number")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
