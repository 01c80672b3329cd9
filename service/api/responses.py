"""JSON responses rendered by orjson (numpy arrays serialise directly)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse

ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # orjson serialises C-contiguous arrays only
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def loads(data: str | bytes) -> Any:
    """Decode a JSON request with orjson; what orjson refuses gets the standard library's reading.

    The second reading keeps the API's messages for values orjson does not take (``NaN`` and
    ``Infinity`` literals, integers beyond 64 bits), which the data plane then names precisely.
    Raises ``ValueError`` (with the first parser's reason) when the text is not JSON at all, or
    is nested too deeply to read.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise ValueError(str(exc)) from None


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, default=_fallback, option=ORJSON_OPTIONS)


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(
    status_code: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: Mapping[str, object] | None = None,
) -> Any:
    """``{"error": message, **details}`` with the status and headers."""
    body = {"error": message, **(details or {})}
    return OrjsonResponse(body, status_code=status_code, headers=headers)
