"""Serves the live page's static files at ``/ui/``.

The page is plain HTML, CSS and JavaScript modules with no build step. It is a client of the
public API like any other (``/v1/models``, ``/v1/stats``, the ``/v1/stream`` websocket), so this
module only hands out files. The example series (``co2_changes.csv``) is a copy of
``examples/co2_changes.csv`` kept in the static folder, because the page cannot read the
repository; a test checks that the two stay equal.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
MOUNT_PATH = "/ui"


def mount_ui(app: FastAPI) -> None:
    """Serve the page at ``/ui/`` (``/ui`` redirects there); no API key is needed for it, as
    for ``/docs``: the page asks for one and sends it with its API calls."""
    app.mount(MOUNT_PATH, StaticFiles(directory=STATIC_DIR, html=True), name="ui")
