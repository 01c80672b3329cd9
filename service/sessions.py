"""Streaming sessions: ids, owners, lifecycle, the per-session lock and idle expiry."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from service.errors import (
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
    SessionStateConflict,
)

if TYPE_CHECKING:
    from service.dataplane import ServedModel

logger = logging.getLogger(__name__)

EXPIRED_IDS_REMEMBERED = 100_000  # expired ids answer "expired" (not "not found") this long


class SessionState(Enum):
    """open: idle or stepped over HTTP; streaming: a websocket is attached; closed and expired are
    final (the slot is back in the pool)."""

    OPEN = "open"
    STREAMING = "streaming"
    CLOSED = "closed"
    EXPIRED = "expired"


LIVE = (SessionState.OPEN, SessionState.STREAMING)


@dataclass(eq=False)
class Session:
    """One stream of steps through one model version, its state in ``model.pool[slot]``."""

    id: str
    model: ServedModel
    slot: int
    owner: str | None  # the API key that created it, or None without authentication
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    step_count: int = 0
    state: SessionState = SessionState.OPEN
    attachment: int = 0  # id of the websocket attached while streaming
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # steps run one at a time, FIFO

    def require(self, *allowed: SessionState) -> None:
        """Raise ``SessionStateConflict`` unless the session is in one of ``allowed``."""
        if self.state not in allowed:
            raise SessionStateConflict(self.id, allowed, self.state)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionManager:
    """All live sessions. Used from the event loop thread only."""

    def __init__(self, max_sessions: int, idle_ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._attachments = 0
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, model: ServedModel, owner: str | None) -> Session:
        if len(self._sessions) >= self.max_sessions:
            self.expire_idle()
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitReached(self.max_sessions)
        slot = model.pool.acquire()
        session = Session(id=secrets.token_urlsafe(24), model=model, slot=slot, owner=owner)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, owner: str | None) -> Session:
        """The live session ``session_id`` of ``owner``; 404 for anyone else's."""
        session = self._sessions.get(session_id)
        if session is not None and self._idle_too_long(session, time.monotonic()):
            self._end(session, SessionState.EXPIRED)
            session = None
        if session is None or session.owner != owner:
            if session is None and session_id in self._expired:
                raise SessionExpired(session_id, self.idle_ttl_s)
            raise SessionNotFound(session_id)
        return session

    def get_any(self, session_id: str) -> Session | None:
        """The live session ``session_id`` whoever owns it (for internal bookkeeping)."""
        return self._sessions.get(session_id)

    def mark_used(self, session: Session) -> None:
        session.touch()
        if session.id in self._sessions:
            self._sessions.move_to_end(session.id)

    def close(self, session: Session) -> None:
        session.require(*LIVE)
        self._end(session, SessionState.CLOSED)

    def attach(self, session: Session) -> int:
        """Mark the session streaming for a new websocket; a newer connection takes over."""
        session.require(*LIVE)
        self._attachments += 1
        session.attachment = self._attachments
        session.state = SessionState.STREAMING
        return session.attachment

    def detach(self, session: Session, attachment: int) -> None:
        if session.state is SessionState.STREAMING and session.attachment == attachment:
            session.state = SessionState.OPEN
            self.mark_used(session)

    def expire_idle(self) -> int:
        """End sessions idle for longer than the TTL; return how many."""
        now, expired = time.monotonic(), 0
        for session in list(self._sessions.values()):
            if session.last_used > now - self.idle_ttl_s:
                break  # least recently used first: the rest are younger
            if self._idle_too_long(session, now):
                self._end(session, SessionState.EXPIRED)
                expired += 1
        return expired

    def _idle_too_long(self, session: Session, now: float) -> bool:
        return (
            self.idle_ttl_s > 0
            and session.state is SessionState.OPEN
            and not session.lock.locked()
            and now - session.last_used > self.idle_ttl_s
        )

    def _end(self, session: Session, state: SessionState) -> None:
        session.state = state
        del self._sessions[session.id]
        session.model.pool.release(session.slot)
        if state is SessionState.EXPIRED:
            self._expired[session.id] = None
            if len(self._expired) > EXPIRED_IDS_REMEMBERED:
                self._expired.popitem(last=False)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self._end(session, SessionState.CLOSED)

    def start_sweeper(self) -> None:
        if self.idle_ttl_s > 0:
            self._sweeper = asyncio.create_task(self._sweep(), name="session sweeper")

    async def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def _sweep(self) -> None:
        interval = min(max(self.idle_ttl_s / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            if count := self.expire_idle():
                logger.info("expired %d idle sessions", count)
