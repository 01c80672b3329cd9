"""``python -m service --host H --port P --models-dir DIR``; each flag is also ``RNNSERVE_*``."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.api.ws_protocol import ServiceWebSocketProtocol
from service.app import create_app
from service.settings import Settings, describe_settings

GC_YOUNG_THRESHOLD = 10_000  # container allocations between young collections (CPython: 700)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve recurrent ONNX models. Flags override RNNSERVE_* environment variables.",
        epilog="Every setting, with its environment variable: docs/reference/settings.md.",
    )
    for setting in describe_settings():
        default = f"default: {setting.default}" if setting.default else "no default"
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            help=f"{setting.doc} ({setting.kind}; {default}) [{setting.env}]",
        )
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings from flags (given ones only) over environment variables; exits on bad values."""
    args = build_parser().parse_args(argv)
    given = {name: value for name, value in vars(args).items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        sys.exit(f"invalid settings:\n{problems}")


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    Everything imported so far lives as long as the process: ``gc.freeze`` moves it out of the
    collector's sight, so a full collection no longer walks some 90,000 objects (about 60 ms
    per full collection under load, the service's worst step latencies). Each in-flight step
    holds a few dozen containers that survive young collections; collecting less often promotes
    fewer of them to the old generation, and young collections cost less in total.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    tune_gc()
    uvicorn.Server(server_config(app, settings)).run()


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for the app: limits, keepalive, the bounded websocket protocol."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "ws": ServiceWebSocketProtocol,
        "ws_max_size": settings.max_request_bytes,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_interval_s,
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)


if __name__ == "__main__":
    main()
