"""Exception handlers: every error leaves the service as ``{"error": "<message>"}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.api.responses import error_response
from service.engine.errors import ServiceError, internal_error

logger = logging.getLogger(__name__)


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    response: Response = error_response(exc.status_code, exc.message, exc.headers, exc.details)
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response: Response = error_response(exc.status_code, str(exc.detail), exc.headers)
    return response


async def validation_error(request: Request, exc: Exception) -> Response:
    """Malformed JSON is 400; a missing or mistyped field is 422 naming the field."""
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = list(exc.errors())
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "not valid JSON")
            response: Response = error_response(400, f"malformed JSON body: {reason}")
            return response
    problems = "; ".join(_describe(error) for error in errors)
    return error_response(422, f"invalid request: {problems}")  # type: ignore[no-any-return]


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    if location[:1] == ["body"] and len(location) == 1:
        missing = error["type"] == "missing"
        return "the request body is missing" if missing else "the body must be a JSON object"
    if location[0] in ("body", "path", "query", "header"):
        location = location[1:]
    field = ".".join(location)
    return f"{field}: {error['msg']}"


async def unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    response: Response = error_response(500, internal_error(exc))
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
