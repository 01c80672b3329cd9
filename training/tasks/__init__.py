"""Tasks: seeded, reproducible data splits with train-only normalisation and task-specific metrics.

``build_task(name, options)`` builds any registered task; ``TASKS`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from training.tasks.adding import AddingTask, adding_task
from training.tasks.base import (
    SPLITS,
    Normalization,
    SequenceSplit,
    Task,
    TaskError,
    TaskOptions,
    predict,
)
from training.tasks.counting import CountingTask, counting_split, counting_string, counting_task
from training.tasks.csvfile import CsvError
from training.tasks.series import SeriesTask, co2_task, csv_task, sunspots_task

TASKS: dict[str, Callable[[TaskOptions], Task]] = {
    "co2": co2_task,
    "csv": csv_task,
    "adding": adding_task,
    "anbn": partial(counting_task, with_c=False),
    "anbncn": partial(counting_task, with_c=True),
    "sunspots": sunspots_task,
}


def build_task(name: str, options: TaskOptions | None = None) -> Task:
    """Build the task registered as ``name``; ``options`` default to :class:`TaskOptions`()."""
    try:
        builder = TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
    return builder(options or TaskOptions())


__all__ = [
    "SPLITS",
    "TASKS",
    "AddingTask",
    "CountingTask",
    "CsvError",
    "Normalization",
    "SequenceSplit",
    "SeriesTask",
    "Task",
    "TaskError",
    "TaskOptions",
    "build_task",
    "counting_split",
    "counting_string",
    "predict",
]
