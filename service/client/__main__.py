"""Command line: ``python -m service.client stream --model NAME --csv FILE --column C``.

``stream`` streams a series to the service's websocket one chunk at a time and prints each
step's prediction as it arrives: ``step<TAB>inputs<TAB>outputs`` (comma-separated), or one JSON
object per line with ``--json``. ``mux`` streams several columns at once over ``/v1/mux``, one
session per column and one frame per row, and prints ``column<TAB>step<TAB>input<TAB>output``.
Notices (reconnects, a summary) go to stderr. Exit status 0 on success, 1 with a one-line
``error: ...`` message on any failure, 2 for a wrong command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from service.client.mux import stream_columns
from service.client.series import ClientError, Row, iter_text_rows, read_csv_rows
from service.client.stream import RetryPolicy, StepResult, StreamClient, StreamTarget


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stream = commands.add_parser("stream", help="stream a series and print each prediction")
    stream.add_argument("--url", default="ws://127.0.0.1:8000", help="server base URL")
    target = stream.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="open a new session of this model")
    target.add_argument(
        "--session-id", help="resume this session (write --session-id=ID if ID starts with '-')"
    )
    stream.add_argument("--version", type=int, help="model version (default: the highest)")
    stream.add_argument(
        "--append",
        action="store_true",
        help="with --session-id: send every row as a new step instead of skipping the rows the "
        "session already applied",
    )
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV file with a header line")
    source.add_argument("--stdin", action="store_true", help="read steps from stdin, one line each")
    stream.add_argument("--column", help="the CSV column to stream (one feature)")
    stream.add_argument("--columns", help="comma-separated CSV columns (several features)")
    stream.add_argument("--chunk", type=int, default=1, help="steps per frame (default 1)")
    stream.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    stream.add_argument(
        "--max-retries", type=int, default=5, help="reconnect attempts in a row (default 5)"
    )
    stream.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for a reply (default 30)"
    )
    stream.add_argument("--json", action="store_true", help="print JSON lines")
    _add_mux_command(commands)
    return parser


def _add_mux_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mux = commands.add_parser(
        "mux", help="stream several CSV columns at once over /v1/mux, one session per column"
    )
    mux.add_argument("--url", default="ws://127.0.0.1:8000", help="server base URL")
    mux.add_argument("--model", required=True, help="the model (one input per step)")
    mux.add_argument("--version", type=int, help="model version (default: the highest)")
    mux.add_argument("--csv", type=Path, required=True, help="CSV file with a header line")
    mux.add_argument("--columns", required=True, help="comma-separated columns, one per session")
    mux.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    mux.add_argument(
        "--max-retries", type=int, default=5, help="reconnect attempts in a row (default 5)"
    )
    mux.add_argument("--json", action="store_true", help="print JSON lines")


def csv_columns(args: argparse.Namespace) -> list[str]:
    """The columns named by ``--column`` and ``--columns``, in order."""
    if args.column is None and args.columns is None:
        raise ClientError("--csv needs --column NAME or --columns A,B")
    columns = [args.column] if args.column is not None else []
    if args.columns is not None:
        columns += [name.strip() for name in args.columns.split(",") if name.strip()]
    return columns


def input_rows(args: argparse.Namespace) -> Iterable[Row]:
    if args.stdin:
        if args.column is not None or args.columns is not None:
            raise ClientError("--column and --columns apply to --csv, not --stdin")
        return iter_text_rows(sys.stdin)
    return read_csv_rows(args.csv, csv_columns(args))


def format_result(result: StepResult, as_json: bool) -> str:
    if as_json:
        return json.dumps({"step": result.index, "input": result.inputs, "output": result.outputs})
    inputs = ",".join(repr(value) for value in result.inputs)
    outputs = ",".join(repr(value) for value in result.outputs)
    return f"{result.index}\t{inputs}\t{outputs}"


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)


async def run_stream(args: argparse.Namespace, out: TextIO) -> None:
    target = StreamTarget(
        url=args.url,
        model=args.model,
        version=args.version,
        session_id=args.session_id,
        api_key=args.api_key,
    )
    client = StreamClient(
        target,
        chunk_size=args.chunk,
        retry=RetryPolicy(max_retries=args.max_retries),
        reply_timeout=args.timeout,
        append=args.append,
        notify=notice,
    )
    steps = 0
    async for result in client.stream(input_rows(args)):
        print(format_result(result, args.json), file=out, flush=True)
        steps += 1
    if client.session is not None:
        session = client.session
        notice(
            f"streamed {steps} steps to session {session.session_id} ({session.model} "
            f"v{session.version}, {client.step_count} steps applied in all, "
            f"{client.reconnects} reconnects)"
        )


async def run_mux(args: argparse.Namespace, out: TextIO) -> None:
    columns = [name.strip() for name in args.columns.split(",") if name.strip()]
    rows = read_csv_rows(args.csv, columns)
    steps = stream_columns(
        args.url,
        args.model,
        columns,
        rows,
        api_key=args.api_key,
        version=args.version,
        retry=RetryPolicy(max_retries=args.max_retries),
        notify=notice,
    )
    count = 0
    async for step in steps:
        if args.json:
            line = json.dumps(
                {
                    "column": step.column,
                    "step": step.index,
                    "input": step.inputs,
                    "output": step.outputs,
                }
            )
        else:
            outputs = ",".join(repr(value) for value in step.outputs)
            line = f"{step.column}\t{step.index}\t{step.inputs[0]!r}\t{outputs}"
        print(line, file=out, flush=True)
        count += 1
    notice(f"streamed {count} steps through {len(columns)} sessions")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = run_mux if args.command == "mux" else run_stream
    try:
        asyncio.run(run(args, out or sys.stdout))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as Unix tools do. Python would
        # report the pipe again when flushing stdout at exit, so point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
