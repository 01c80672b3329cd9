"""Errors of the durable session path; each carries its HTTP status like every ``ServiceError``."""

from __future__ import annotations

from collections.abc import Iterable

from service.engine.errors import Conflict, NotFound, ServiceError, Unavailable


class StoreUnavailable(Unavailable):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(
            f"session store unavailable: cannot reach Redis at {where} ({reason}); "
            "the session is unchanged, retry shortly"
        )


class OutcomeUnknown(Unavailable):
    """A write the store did not confirm, and whose outcome could not be read back."""

    def __init__(self, session_id: str, step_count: int, reason: str) -> None:
        super().__init__(
            f"the session store did not confirm this step of session {session_id!r} ({reason}), "
            f"and the outcome could not be read back: it may or may not have been applied. The "
            f"session was at step {step_count} before it; read GET /v1/sessions/{session_id}, or "
            f"retry with expected_step_count {step_count}",
            step_count=step_count,
        )


class SessionConflict(Conflict):
    """Another replica (or request) advanced the session first; this step was not applied."""

    def __init__(self, session_id: str, expected: int, found: int | None) -> None:
        now = "was deleted" if found is None else f"is at revision {found}"
        super().__init__(
            f"session {session_id!r} was changed concurrently (expected revision {expected}, "
            f"it {now}); this step was not applied and the session keeps its stored state"
        )


class SessionModelNotServed(NotFound):
    def __init__(self, session_id: str, model: str, version: int, served: Iterable[int]) -> None:
        versions = ", ".join(str(v) for v in sorted(served)) or "none"
        super().__init__(
            f"session {session_id!r} runs on model {model!r} version {version}, which is not "
            f"loaded here (served versions of {model!r}: {versions}); create a new session"
        )


class CorruptRecord(Exception):
    """A stored record that cannot be decoded (wrong magic, header or size)."""


class StoredSessionNotFound(NotFound):
    def __init__(self, session_id: str, idle_ttl_s: float) -> None:
        expiry = f" or expired after {idle_ttl_s:g} s idle" if idle_ttl_s > 0 else ""
        super().__init__(f"session {session_id!r} not found (it may have been deleted{expiry})")


class StoredSessionUnreadable(ServiceError):
    status_code = 500

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"session {session_id!r} cannot be restored from the store: {reason}")


class SessionBusy(Unavailable):
    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} was reloaded repeatedly while this step waited; retry"
        )
