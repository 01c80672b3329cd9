"""Errors of the service: one base class carrying the HTTP status and the websocket close code.

Every error reaches the client as ``{"error": "<message>"}`` with ``status_code``. On the websocket,
errors about one frame are answered with an error frame and the connection stays open; errors about
the connection or its session close it with ``4000 + status_code`` (see ``CLOSE_CODES``).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

# Websocket close codes the service uses, documented in docs/reference/websocket.md.
CLOSE_CODES: dict[int, str] = {
    1000: "normal closure (the client sent {'close': true}; the session is deleted)",
    1012: "service restart: the server is shutting down; with the Redis store, resume on any "
    "replica with ?session_id (with the memory store the session ends with the process)",
    1009: "message too big (over max_request_bytes)",
    1011: "internal error",
    4400: "bad request when opening (no model and no session_id, or both)",
    4401: "missing or wrong API key",
    4404: "unknown model, version or session, or the session expired or was deleted",
    4409: "the session was taken over by a newer connection",
    4503: "service not ready or max sessions reached",
}


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status_code: int = 500
    retry_after_s: int | None = None  # sent as Retry-After with 503s

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def close_code(self) -> int:
        internal = self.status_code >= 500 and self.status_code != 503
        return 1011 if internal else 4000 + self.status_code

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class BadRequest(ServiceError):
    """The request cannot be read: malformed JSON, non-numeric or non-finite values."""

    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, reason: str) -> None:
        super().__init__(f"unauthorized: {reason}")


class NotFound(ServiceError):
    status_code = 404


class ModelNotFound(NotFound):
    def __init__(self, name: str, available: Iterable[str]) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"model {name!r} not found; available models: {names}")


class VersionNotFound(NotFound):
    def __init__(self, name: str, version: int, available: Iterable[int]) -> None:
        versions = ", ".join(str(v) for v in sorted(available))
        super().__init__(f"model {name!r} has no version {version}; available versions: {versions}")


class SessionNotFound(NotFound):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")


class SessionExpired(NotFound):
    def __init__(self, session_id: str, idle_ttl_s: float) -> None:
        super().__init__(
            f"session {session_id!r} expired after {idle_ttl_s:g} s idle; create a new session"
        )


class Conflict(ServiceError):
    status_code = 409


class SessionStateConflict(Conflict):
    def __init__(self, session_id: str, expected: Iterable[Enum], found: Enum) -> None:
        wanted = " or ".join(state.value for state in expected)
        super().__init__(f"session {session_id!r} is {found.value}; expected {wanted}")


class SessionTakenOver(Conflict):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} was taken over by a newer connection")


class PayloadTooLarge(ServiceError):
    status_code = 413


class ChunkTooLarge(PayloadTooLarge):
    def __init__(self, where: str, steps: int, limit: int) -> None:
        super().__init__(f"{where} has {steps} steps; at most {limit} steps are allowed per chunk")


class BodyTooLarge(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")


class InvalidInput(ServiceError):
    """Well-formed values of the wrong shape: wrong feature count, empty inputs."""

    status_code = 422


class Unavailable(ServiceError):
    status_code = 503
    retry_after_s = 1


class NotReady(Unavailable):
    def __init__(self) -> None:
        super().__init__("service is not ready: models are still loading or none could be loaded")


class SessionLimitReached(Unavailable):
    def __init__(self, limit: int) -> None:
        super().__init__(f"too many sessions: the limit of {limit} open sessions is reached")


class QueueFull(Unavailable):
    def __init__(self, model: str, version: int, depth: int) -> None:
        super().__init__(
            f"model {model!r} version {version} is overloaded: {depth} chunks already queued"
        )


class InferenceFailed(ServiceError):
    status_code = 500

    def __init__(self, model: str, version: int, reason: str) -> None:
        super().__init__(f"model {model!r} version {version} failed to run the batch: {reason}")
