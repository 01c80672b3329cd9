"""The per-step HTTP endpoints as raw ASGI handlers, served ahead of FastAPI's routing.

``POST /v1/sessions/{id}/steps`` and V2 ``POST /v2/models/{m}[/versions/{v}]/infer`` are the
requests a streaming client sends once per chunk. Here each is one function: authenticate, read
the body (bounded in size and time), decode it once with orjson, call the data plane, answer.
No routing table scan, no dependency resolution, no pydantic, no middleware stack; the answers,
statuses and messages are the same as the FastAPI routes declared in ``service.api.rest`` and
``service.v2.routes`` give (those routes remain the documented interface at ``/docs``, serve the
requests when ``fast_paths`` is off, and a test checks both answer alike).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from service.api.asgi import (
    JSON_TYPE,
    ClientGone,
    encoded_headers,
    header_text,
    read_body,
    send_error,
    send_response,
)
from service.api.auth import identify
from service.api.responses import dumps, loads
from service.engine.errors import BadRequest, InvalidInput, ServiceError, internal_error
from service.v2.codec import decode_request
from service.v2.routes import decompress, infer_response

logger = logging.getLogger(__name__)

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, body, headers (content-type too)
JSON_HEADERS = [JSON_TYPE]
STEPS_PREFIX, STEPS_SUFFIX = "/v1/sessions/", "/steps"
V2_PREFIX, INFER_SUFFIX = "/v2/models/", "/infer"
STEP_FIELDS = frozenset({"inputs", "expected_step_count"})


class HotPaths:
    """Matches the per-step requests and serves them; ``None`` from ``handler`` means "route
    it through FastAPI"."""

    def __init__(self, state: State, websockets: dict[str, Handler]) -> None:
        self._state = state  # the app's state: settings now, the data plane once started
        self._websockets = websockets  # path -> endpoint

    def handler(self, scope: Scope) -> Handler | None:
        if scope["type"] == "websocket":
            # The streams too: their frame loops then resume through a few coroutine frames
            # per frame instead of the dozen of FastAPI's middleware and routing.
            return self._websockets.get(scope["path"])
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if path.startswith(STEPS_PREFIX) and path.endswith(STEPS_SUFFIX):
            session_id = path[len(STEPS_PREFIX) : -len(STEPS_SUFFIX)]
            if session_id and "/" not in session_id:
                return lambda s, r, w: self._guarded(self._step(s, r, session_id), w)
        elif path.startswith(V2_PREFIX) and path.endswith(INFER_SUFFIX):
            target = _infer_target(path[len(V2_PREFIX) : -len(INFER_SUFFIX)])
            if target is not None:
                name, version = target
                return lambda s, r, w: self._guarded(self._infer(s, r, name, version), w)
        return None

    async def _guarded(self, answer: Awaitable[Answer], send: Send) -> None:
        """Send what ``answer`` produces, or the error it raises, as the FastAPI app would."""
        try:
            status, body, headers = await answer
        except ServiceError as error:
            await send_error(send, error, dumps(error.body()))
            return
        except ClientGone:
            return
        except Exception as exc:
            logger.exception("unhandled error on a per-step request")
            body = dumps({"error": internal_error(exc)})
            await send_response(send, 500, body, JSON_HEADERS)
            return
        await send_response(send, status, body, headers=headers)

    def _caller(self, scope: Scope) -> str | None:
        keys: list[str] = self._state.settings.api_keys
        if not keys:
            return None
        return identify(keys, header_text(scope, b"authorization"))

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        settings = self._state.settings
        return await read_body(receive, scope, settings.max_request_bytes, settings.body_timeout_s)

    async def _step(self, scope: Scope, receive: Receive, session_id: str) -> Answer:
        caller = self._caller(scope)
        inputs, expected = parse_step_body(await self._body(scope, receive))
        result = await self._state.dataplane.step(
            session_id, inputs, caller, expected_step_count=expected
        )
        body = dumps({"outputs": result.outputs, "step_count": result.step_count})
        return 200, body, JSON_HEADERS

    async def _infer(
        self, scope: Scope, receive: Receive, name: str, version: int | None
    ) -> Answer:
        caller = self._caller(scope)
        body = await self._body(scope, receive)
        limit = self._state.settings.max_request_bytes
        body = decompress(body, header_text(scope, b"content-encoding"), limit)
        request = decode_request(body, header_text(scope, b"inference-header-content-length"))
        state = self._state
        content, headers = await infer_response(
            state.dataplane, state.v2_sequences, name, version, request, caller
        )
        return 200, content, encoded_headers(headers)


def _infer_target(middle: str) -> tuple[str, int | None] | None:
    """``name`` or ``name/versions/V`` -> (name, version); None when it is neither."""
    name, _, rest = middle.partition("/")
    if not name:
        return None
    if not rest:
        return name, None
    label, _, version = rest.partition("/")
    if label != "versions" or not version.isdigit() or not version.isascii():
        return None  # FastAPI answers these (404, or 422 for a version that is not a number)
    return name, int(version)


def parse_step_body(body: bytes) -> tuple[Any, int | None]:
    """``inputs`` and ``expected_step_count`` of a step request, with the API's messages."""
    if not body.strip():
        raise InvalidInput("invalid request: the request body is missing")
    try:
        document = loads(body)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if type(document) is not dict:
        raise InvalidInput("invalid request: the body must be a JSON object")
    if "inputs" not in document:
        raise InvalidInput("invalid request: inputs: Field required")
    if len(document) > 1:
        extra = sorted(set(document) - STEP_FIELDS)
        if extra:
            raise InvalidInput(f"invalid request: {extra[0]}: Extra inputs are not permitted")
    inputs = document["inputs"]
    if type(inputs) is not list:
        raise InvalidInput("invalid request: inputs: Input should be a valid list")
    return inputs, expected_step_count(document.get("expected_step_count"))


def expected_step_count(value: Any) -> int | None:
    """Check an ``expected_step_count`` field (REST body, websocket frame): absent (None) or an
    integer >= 0."""
    if value is None:
        return None
    if type(value) is not int:
        raise InvalidInput("invalid request: expected_step_count: Input should be a valid integer")
    if value < 0:
        raise InvalidInput(
            "invalid request: expected_step_count: Input should be greater than or equal to 0"
        )
    return value
