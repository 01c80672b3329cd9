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
