"""JSON responses rendered by orjson (numpy arrays serialise directly)."""

from __future__ import annotations

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


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, default=_fallback, option=ORJSON_OPTIONS)


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    return OrjsonResponse({"error": message}, status_code=status_code, headers=headers)
