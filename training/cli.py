"""``python -m training``: train, export and evaluate models, and run the studies (``experiments``).

A thin layer: it turns arguments into a :class:`TrainConfig` or a function call, and every error a
user can cause into one ``error: ...`` line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from training.cells import CELLS
from training.checkpoint import CheckpointError, load_checkpoint
from training.experiments.command import add_parser as add_experiments_parser
from training.experiments.command import run_experiments
from training.tasks import SPLITS, TASKS, TaskError, TaskOptions, build_task
from training.train import ConfigError, TrainConfig, train

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs, reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one ``error: ...`` line instead of usage and a name."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _add_train(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a task",
        description="Train a model; prints the run's summary as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = TrainConfig()
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--cell", choices=list(CELLS), default=d.cell, help="recurrent cell")
    model.add_argument("--task", choices=list(TASKS), default=d.task, help="what to learn")
    model.add_argument("--hidden-size", type=int, default=d.hidden_size, help="units per layer")
    model.add_argument("--num-layers", type=int, default=d.num_layers, help="stacked layers")
    model.add_argument("--dropout", type=float, default=d.dropout, help="between layers, [0, 1)")
    model.add_argument("--epochs", type=int, default=d.epochs, help="most epochs to run")
    model.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    model.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    model.add_argument("--clip-norm", type=float, default=d.clip_norm, help="gradient norm clip")
    model.add_argument("--seed", type=int, default=d.seed, help="seeds the data and the model")
    model.add_argument("--device", default=d.device, help="cpu or cuda[:N]")
    model.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch")
    model.add_argument(
        "--patience", type=int, default=d.patience, help="stop after N epochs without progress"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=d.out, help="folder for checkpoint and summary")
    out.add_argument("--plot", action="store_true", help="also write loss.png")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_task_options(p)


def _add_task_options(p: argparse.ArgumentParser) -> None:
    t = TaskOptions()
    series = p.add_argument_group("series tasks (csv, co2)")
    series.add_argument("--csv", type=Path, help="CSV file with a header row (csv task)")
    series.add_argument("--features", type=_names, default=(), help="input columns, a,b,c")
    series.add_argument("--target", help="column to forecast (csv task)")
    series.add_argument("--horizon", type=int, default=t.horizon, help="rows ahead to forecast")
    series.add_argument(
        "--difference", action="store_true", help="forecast changes: inputs and target differenced"
    )
    series.add_argument(
        "--train-windows", type=int, default=t.train_windows, help="random training windows"
    )
    adding = p.add_argument_group("adding task")
    adding.add_argument("--seq-len", type=int, default=t.seq_len, help="steps per sequence")
    adding.add_argument("--train-size", type=int, default=t.train_size, help="train sequences")
    adding.add_argument("--eval-size", type=int, default=t.eval_size, help="val/test sequences")
    counting = p.add_argument_group("counting tasks (anbn, anbncn)")
    counting.add_argument(
        "--n-train-max", type=int, default=t.n_train_max, help="train on n = 1..N"
    )
    counting.add_argument(
        "--n-test-max", type=int, default=t.n_test_max, help="test on n = n-train-max+1..N"
    )


def _add_export(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to models/<name>/<version>/",
        description=(
            "Write model.onnx and metadata.json for the service (docs/reference/model-format.md)."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by train")
    p.add_argument("--out", type=Path, required=True, help="folder, e.g. models/co2-forecaster/1")
    p.add_argument("--name", help="model name (default: the folder's parent, <name>)")
    p.add_argument("--version", type=int, help="model version (default: the folder name)")
    p.add_argument("--graph", default="auto", help="auto, scan or native (gru and lstm only)")
    p.add_argument(
        "--force", action="store_true", help="overwrite a version folder that holds a model"
    )


def _add_evaluate(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="print a checkpoint's metrics as JSON",
        description="Rebuild the checkpoint's task from its saved options and score the model.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by train")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to score")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training",
        description="Train recurrent models, export them for the service, evaluate checkpoints "
        "and run the studies.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(subparsers)
    _add_export(subparsers)
    _add_evaluate(subparsers)
    add_experiments_parser(subparsers)
    return parser


def run_train(args: argparse.Namespace) -> None:
    options = TaskOptions(
        seed=args.seed,
        csv=args.csv,
        features=args.features,
        target=args.target,
        horizon=args.horizon,
        difference=args.difference,
        train_windows=args.train_windows,
        seq_len=args.seq_len,
        train_size=args.train_size,
        eval_size=args.eval_size,
        n_train_max=args.n_train_max,
        n_test_max=args.n_test_max,
    )
    config = TrainConfig(
        cell=args.cell,
        task=args.task,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clip_norm=args.clip_norm,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        patience=args.patience,
        out=args.out,
        plot=args.plot,
        progress=not args.no_progress,
        task_options=options,
    )
    result = train(config)
    print(json.dumps(result.summary, indent=2))


def run_export(args: argparse.Namespace) -> None:
    try:
        from training.export import export_checkpoint
    except ImportError as exc:
        raise UsageError(f"export is not available: {exc}") from None
    path = export_checkpoint(
        args.checkpoint,
        args.out,
        name=args.name,
        version=args.version,
        graph=args.graph,
        force=args.force,
    )
    print(path)


def run_evaluate(args: argparse.Namespace) -> None:
    checkpoint = load_checkpoint(args.checkpoint)
    saved = dict(checkpoint.task)
    name = saved.pop("name", None)
    if name not in TASKS:
        raise UsageError(f"checkpoint {args.checkpoint} does not name a known task ({name!r})")
    for key in ("description", "feature_names", "output_names"):
        saved.pop(key, None)
    task = build_task(name, TaskOptions.from_dict(saved))
    metrics = task.evaluate(checkpoint.build_model(), task.split(args.split))
    print(json.dumps({"task": name, "split": args.split, "metrics": metrics}, indent=2))


COMMANDS = {
    "train": run_train,
    "export": run_export,
    "evaluate": run_evaluate,
    "experiments": run_experiments,
}


def _user_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (UsageError, TaskError, ConfigError, CheckpointError)
    try:
        from training.export import ExportError
    except ImportError:
        return errors
    return (*errors, ExportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 for a user mistake)."""
    try:
        args = make_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:  # an output folder that cannot be written, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
