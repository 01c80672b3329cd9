"""Errors of the service: one base class carrying the HTTP status and the websocket close code.

Every error reaches the client as ``{"error": "<message>", **details}`` with ``status_code`` (most
errors have no details; a step-count conflict adds the session's ``step_count``). On the websocket,
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
    4429: "this API key holds the most sessions one key may (--max-sessions-per-key)",
    4503: "service not ready or max sessions reached",
}


def internal_error(exc: BaseException) -> str:
    """What a client is told of a bug: the exception's type, never its text or traceback."""
    return f"internal error: {type(exc).__name__}"


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status_code: int = 500
    retry_after_s: int | None = None  # sent as Retry-After with 503s
    ends_stream = False  # on a websocket: the connection or its session is gone, so close

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details  # extra fields of the error body, beside "error"

    def body(self) -> dict[str, object]:
        """The JSON error body: ``{"error": message}`` plus the details."""
        return {"error": self.message, **self.details}

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
    ends_stream = True
    status_code = 401

    def __init__(self, reason: str) -> None:
        super().__init__(f"unauthorized: {reason}")


class NotFound(ServiceError):
    ends_stream = True
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


class SessionModelUnloaded(NotFound):
    """The session's model version was unloaded (or reloaded from changed files) meanwhile."""

    def __init__(
        self, session_id: str, model: str, version: int, served: Iterable[int], reloaded: bool
    ) -> None:
        # The model and versions come first: a websocket close reason keeps only 123 bytes.
        versions = ", ".join(str(v) for v in sorted(served)) or "none"
        what = "was reloaded from changed files" if reloaded else "was unloaded"
        super().__init__(
            f"model {model!r} version {version} {what} (served versions: {versions}); "
            f"session {session_id!r} ended with it; create a new session"
        )


class ModelNotInRepository(NotFound):
    def __init__(self, action: str, name: str, available: Iterable[str]) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"failed to {action} {name!r}: the models folder has no model {name!r} and none is "
            f"loaded; models there: {names}"
        )


class SessionExpired(NotFound):
    def __init__(self, session_id: str, idle_ttl_s: float) -> None:
        super().__init__(
            f"session {session_id!r} expired after {idle_ttl_s:g} s idle; create a new session"
        )


class InvalidModelName(BadRequest):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"{name!r} is not a valid model name: lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit"
        )


class ModelLoadRefused(BadRequest):
    """Versions of a model that cannot serve, each with its reason; the others serve."""

    def __init__(self, name: str, refusals: Iterable[str], serving: Iterable[int]) -> None:
        versions = ", ".join(str(v) for v in sorted(serving)) or "none"
        super().__init__(
            f"failed to load {name!r}: {'; '.join(refusals)} (versions serving: {versions})"
        )


class Conflict(ServiceError):
    status_code = 409


class SessionStateConflict(Conflict):
    ends_stream = True

    def __init__(self, session_id: str, expected: Iterable[Enum], found: Enum) -> None:
        wanted = " or ".join(state.value for state in expected)
        super().__init__(f"session {session_id!r} is {found.value}; expected {wanted}")


class StepCountMismatch(Conflict):
    """A step sent with ``expected_step_count`` found the session elsewhere; nothing was applied."""

    def __init__(self, session_id: str, expected: int, found: int) -> None:
        super().__init__(
            f"session {session_id!r} is at step {found}, not {expected} as the request expected; "
            "this step was not applied (a retry of a step that was already applied can skip it)",
            step_count=found,
        )


class SessionHeld(Conflict):
    ends_stream = True

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is held by a mux stream (/v1/mux): step, reset or close it "
            "there, or attach it here to take it over"
        )


class SessionTakenOver(Conflict):
    ends_stream = True

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


class RequestTimeout(ServiceError):
    """The client stopped sending its request body; the connection is closed after the answer."""

    status_code = 408

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request body did not arrive within {timeout_s:g} s (it may be shorter than "
            "its Content-Length); the connection is closed"
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class InvalidInput(ServiceError):
    """Well-formed values of the wrong shape: wrong feature count, empty inputs."""

    status_code = 422


class NonFiniteOutput(InvalidInput):
    """The model produced NaN or infinity from these inputs and state; nothing was stored."""

    def __init__(self, model: str, version: int) -> None:
        super().__init__(
            f"model {model!r} version {version} produced NaN or infinity from these inputs and "
            "state (values too large for the model); the state is unchanged"
        )


class SessionQuotaReached(ServiceError):
    """One API key holds as many sessions as it may; the other keys are not affected."""

    status_code = 429
    retry_after_s = 1

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this API key holds {limit} open sessions, the most one key may "
            "(--max-sessions-per-key); close sessions or let idle ones expire"
        )


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


class ModelControlDisabled(ServiceError):
    """Load and unload requests outside explicit mode (Triton answers these as unavailable)."""

    status_code = 503

    def __init__(self, mode: str) -> None:
        why = "if polling is enabled" if mode == "poll" else f"in model control mode {mode!r}"
        super().__init__(
            f"explicit model load / unload is not allowed {why}; start the service with "
            "--model-control-mode explicit to load and unload models through this API"
        )


class InferenceFailed(ServiceError):
    status_code = 500

    def __init__(self, model: str, version: int, reason: str) -> None:
        super().__init__(f"model {model!r} version {version} failed to run the batch: {reason}")
