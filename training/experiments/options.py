"""The options every study takes, and how a study runs its independent trainings."""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from training.cells import CELLS

Result = TypeVar("Result")


@dataclass(frozen=True)
class StudyOptions:
    """How to run a study; each study picks its sizes from ``tiny``."""

    # independent runs per cell (seeds 0..seeds-1); for efficiency, the interleaved rounds
    seeds: int = 5
    out: Path = Path("docs/reports")  # folder for <study>.md and its PNG figures
    tiny: bool = False  # a seconds-long configuration for tests, not for conclusions
    # Training runs at once, one process and one thread each (the efficiency study always times
    # one thing at a time, so that runs do not slow each other down).
    jobs: int = 1

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")

    @property
    def seed_list(self) -> range:
        return range(self.seeds)


def run_all(fn: Callable[..., Result], calls: Sequence[tuple[Any, ...]], jobs: int) -> list[Result]:
    """``[fn(*args) for args in calls]``, in ``jobs`` worker processes when ``jobs > 1``.

    Workers are spawned, not forked: a forked copy of a process that already ran torch can hang.
    Each finished call is counted on stderr, so that a long study shows how far it has come.
    """
    started = time.perf_counter()

    def done(k: int) -> None:
        elapsed = time.perf_counter() - started
        print(f"{k}/{len(calls)} done after {elapsed:.0f} s", file=sys.stderr, flush=True)

    if jobs == 1 or len(calls) < 2:
        results = []
        for k, args in enumerate(calls, start=1):
            results.append(fn(*args))
            done(k)
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for k, _ in enumerate(as_completed(futures), start=1):
            done(k)
        return [future.result() for future in futures]


def run_grid(
    fn: Callable[..., Result],
    groups: Sequence[str],
    call: Callable[[str, str], tuple[Any, ...]],
    jobs: int,
) -> dict[str, dict[str, Result]]:
    """``fn(*call(group, cell))`` for every group (a task, a language) and every cell, run with
    :func:`run_all`; the results as ``{group: {cell: result}}`` in the order of ``CELLS``."""
    keys = [(group, cell) for group in groups for cell in CELLS]
    outcomes = run_all(fn, [call(group, cell) for group, cell in keys], jobs)
    results: dict[str, dict[str, Result]] = {group: {} for group in groups}
    for (group, cell), outcome in zip(keys, outcomes, strict=True):
        results[group][cell] = outcome
    return results
