"""Studies that test the claims about the GRU, its gate variants, the MGU and the LSTM.

``python -m training experiments <study>`` runs one across every cell with several seeds and writes
``<out>/<study>.md`` and its PNG figures. ``STUDIES`` names them; :func:`run_study` runs one. Each
study is a module of this package with a ``run(options) -> Report`` function, imported only when it
runs, so that the command line stays quick to start.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from training.experiments.options import StudyOptions

#: study name -> what it measures
STUDIES: dict[str, str] = {
    "efficiency": "parameters, training time and inference latency at equal size and budget",
    "counting": "aⁿbⁿ and aⁿbⁿcⁿ accuracy against n, far past the training range",
    "forecast": "test error on two real series against linear baselines, and the adding problem",
    "classification": "8x8 digits read row by row and pixel by pixel, at matched parameters",
}


def command_line(study: str, options: StudyOptions) -> str:
    """The command that reruns ``study`` with ``options``, as the report prints it."""
    extra = f" --jobs {options.jobs}" if options.jobs > 1 else ""
    extra += " --tiny" if options.tiny else ""
    return (
        f"python -m training experiments {study} --seeds {options.seeds} --out {options.out}{extra}"
    )


def run_study(study: str, options: StudyOptions) -> Path:
    """Run ``study`` and write its report and figures into ``options.out``; return the report."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    from training.experiments.report import load_average, write_report

    module = importlib.import_module(f"training.experiments.{study}")
    options.out.mkdir(parents=True, exist_ok=True)
    load = load_average()
    started = time.perf_counter()
    report = module.run(options)
    wall_time = time.perf_counter() - started
    return write_report(report, options.out, command_line(study, options), wall_time, load)


__all__ = ["STUDIES", "StudyOptions", "command_line", "run_study"]
