"""What a session store keeps per session, and the interface of a durable backend."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from service.engine.runtime import FloatArray


@dataclass(frozen=True)
class SessionRecord:
    """One session as stored: identity, counters and the recurrent state."""

    session_id: str
    model: str
    version: int  # the model version the state belongs to
    step_count: int
    revision: int  # bumped by every write; a write names the revision it read (compare-and-set)
    owner_hash: str  # hash of the API key that created it ("" without authentication)
    created_at: float  # unix time
    state: FloatArray  # (S, L, m)


@dataclass
class StoreStats:
    """Counters of a store since startup (exported as metrics)."""

    pipelines: int = 0  # round trips, each carrying the commands of one event-loop tick
    commands: int = 0
    conflicts: int = 0
    unavailable: int = 0


class SessionStore(Protocol):
    """A durable session backend shared by replicas.

    ``save`` is a compare-and-set: it writes only if the stored revision is ``record.revision - 1``
    (0: the session must not exist yet) and raises ``SessionConflict`` otherwise.
    """

    stats: StoreStats

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self, session_id: str, known_revision: int) -> SessionRecord | int | None:
        """The record if its revision differs from ``known_revision``; ``known_revision`` if
        unchanged (the state is not transferred); None if there is no such session."""
        ...

    async def save(self, record: SessionRecord) -> None: ...

    async def delete(self, session_id: str) -> None: ...

    async def touch(self, session_ids: list[str]) -> None:
        """Restart the idle TTL of these sessions (attached or read, not written)."""
        ...

    async def get_sequence(self, key: str) -> str | None:
        """The session id of a V2 sequence, or None; restarts the entry's idle TTL."""
        ...

    async def put_sequence(self, key: str, session_id: str) -> None: ...

    async def drop_sequence(self, key: str, session_id: str) -> None:
        """Forget the sequence if it still maps to ``session_id``."""
        ...


def owner_hash(owner: str | None) -> str:
    """A stable, non-reversible tag of an API key (the key itself is never stored)."""
    if owner is None:
        return ""
    return hashlib.sha256(owner.encode()).hexdigest()[:32]
