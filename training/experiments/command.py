"""The ``experiments`` subcommand of ``python -m training``: run a study, print the report path.

``training.cli`` adds the parser with :func:`add_parser` and calls :func:`run_experiments`; every
argument is checked while parsing, so a mistake is reported before any training starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.experiments import STUDIES, StudyOptions, run_study


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def output_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``experiments`` to the subparsers of ``python -m training``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "experiments",
        help="reproduce a claim about the cells as a report",
        description=(
            "Run a study across every cell on the CPU and write <out>/<study>.md and its PNG "
            "figures. The report states the command, the date, the machine and the versions. "
            "Full studies at --seeds 5 --jobs 2 on 2 idle cores: efficiency about 5 minutes, "
            "classification about 15, forecast about 20, counting about 40; --tiny runs in "
            "seconds (for the tests, not for conclusions)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "study",
        choices=list(STUDIES),
        help="; ".join(f"{name}: {what}" for name, what in STUDIES.items()),
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=5,
        help="seeds per cell (0..N-1); for efficiency, the interleaved timing rounds",
    )
    p.add_argument("--out", type=output_folder, default=Path("docs/reports"), help="report folder")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="trainings at once, as separate processes (efficiency always times one thing at "
        "a time)",
    )
    p.add_argument("--tiny", action="store_true", help="seconds-long sizes (for tests)")
    return p


def run_experiments(args: argparse.Namespace) -> None:
    options = StudyOptions(seeds=args.seeds, out=args.out, tiny=args.tiny, jobs=args.jobs)
    print(run_study(args.study, options))
