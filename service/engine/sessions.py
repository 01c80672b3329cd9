"""Streaming sessions: ids, owners, lifecycle, the per-session lock and idle expiry."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from service.engine.errors import (
    SessionExpired,
    SessionLimitReached,
    SessionModelUnloaded,
    SessionNotFound,
    SessionQuotaReached,
    SessionStateConflict,
)
from service.engine.models import ServedModel

logger = logging.getLogger(__name__)

EXPIRED_IDS_REMEMBERED = 100_000  # expired ids answer "expired" (not "not found") this long


def new_session_id() -> str:
    """192 random bits, URL-safe; never starting with '-', which command lines read as a flag."""
    while (session_id := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return session_id


class SessionState(Enum):
    """open: idle or stepped over HTTP; streaming: a websocket is attached; closed and expired are
    final (the slot is back in the pool); evicted: dropped from this replica's memory while a
    durable store keeps it (the next request loads it again, here or on any replica), or because
    its model version was unloaded (the next request learns why)."""

    OPEN = "open"
    STREAMING = "streaming"
    CLOSED = "closed"
    EXPIRED = "expired"
    EVICTED = "evicted"


LIVE = (SessionState.OPEN, SessionState.STREAMING)


class Holder(Protocol):
    """A stream that holds sessions for itself: ``service.engine.groups.StreamGroup``.

    While a session is held, its lock is the holder's, its step count lives with the holder, and
    every other path refuses to step, reset or close it (409); attaching it elsewhere takes it
    over through ``surrender``.
    """

    def step_count(self, session: Session) -> int:
        """The held session's current step count."""
        ...

    def surrender(self, session: Session, reason: str | None = None) -> None:
        """Let go of ``session`` as soon as no step of it is in flight (its lock is released);
        ``reason`` says why, to the stream's client."""
        ...


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
    revision: int = 0  # the store's revision this copy reflects (durable stores only)
    state: SessionState = SessionState.OPEN
    attachment: int = 0  # id of the websocket attached while streaming
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # steps run one at a time, FIFO
    holder: Holder | None = None  # the mux stream holding it, if any

    @property
    def current_step_count(self) -> int:
        """The step count, from the holder while a mux stream holds the session."""
        return self.step_count if self.holder is None else self.holder.step_count(self)

    def require(self, *allowed: SessionState) -> None:
        """Raise ``SessionStateConflict`` unless the session is in one of ``allowed``."""
        if self.state not in allowed:
            raise SessionStateConflict(self.id, allowed, self.state)

    def touch(self) -> None:
        self.last_used = time.monotonic()


@dataclass(frozen=True)
class UnloadedVersion:
    """A model version taken out of service, and the versions of its model still served then."""

    model: str
    version: int
    served: tuple[int, ...]
    reloaded: bool = False  # the same version number came back with changed files

    def error(self, session_id: str) -> SessionModelUnloaded:
        return SessionModelUnloaded(
            session_id, self.model, self.version, self.served, self.reloaded
        )


class SessionManager:
    """All live sessions of this process. Used from the event loop thread only.

    With a durable store (``durable=True``) this is a cache of the store: idle sessions and, when
    full, the least recently used ones are evicted instead of ended, and come back on next use.
    """

    def __init__(
        self, max_sessions: int, idle_ttl_s: float, durable: bool = False, max_per_key: int = 0
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_key = max_per_key
        self._per_key: Counter[str] = Counter()  # sessions in memory per API key
        self.idle_ttl_s = idle_ttl_s
        self.durable = durable
        self.evictions: Counter[str] = Counter()  # ended or evicted sessions, by reason
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._unloaded: OrderedDict[str, tuple[str | None, UnloadedVersion]] = OrderedDict()
        self._attachments = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.on_end: list[Callable[[str], None]] = []  # told the id of each session that ends

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, model: ServedModel, owner: str | None) -> Session:
        return self.adopt(model, new_session_id(), owner)

    def adopt(self, model: ServedModel, session_id: str, owner: str | None) -> Session:
        """Add a session with a zeroed slot (a new one, or one about to be loaded from a store)."""
        self._make_room_for(owner)
        self._make_room()
        slot = model.pool.acquire()
        session = Session(id=session_id, model=model, slot=slot, owner=owner)
        self._sessions[session.id] = session
        if owner is not None:
            self._per_key[owner] += 1
        return session

    def _make_room_for(self, owner: str | None) -> None:
        """Keep each API key within ``max_per_key`` sessions (0: no limit; no key: no limit).

        With a durable store the key's least recently used idle session leaves memory first.
        """
        if owner is None or not self.max_per_key:
            return

        def full() -> bool:
            return self._per_key[owner] >= self.max_per_key

        if full():
            self._free_up(full, owner)
            if full():
                raise SessionQuotaReached(self.max_per_key)

    def lookup(self, session_id: str) -> Session | None:
        """The cached live session ``session_id`` whoever owns it, None if not here (durable)."""
        session = self._sessions.get(session_id)
        if session is not None and self._idle_too_long(session, time.monotonic()):
            self._end(session, self._idle_end)
            return None
        return session

    def evict(self, session: Session, reason: str) -> None:
        """Drop a cached session from memory; the durable store keeps it."""
        if self._sessions.get(session.id) is session:
            self._end(session, SessionState.EVICTED, reason)

    @property
    def _idle_end(self) -> SessionState:
        return SessionState.EVICTED if self.durable else SessionState.EXPIRED

    def _make_room(self) -> None:
        def full() -> bool:
            return len(self._sessions) >= self.max_sessions

        if full():
            self._free_up(full)
            if full():
                raise SessionLimitReached(self.max_sessions)

    def _free_up(self, full: Callable[[], bool], owner: str | None = None) -> None:
        """End idle sessions past their TTL; then, with a durable store, drop least recently used
        idle sessions (of ``owner`` only, when given) from memory while ``full()``."""
        self.expire_idle()
        if not self.durable:
            return
        for session in list(self._sessions.values()):  # least recently used first
            if not full():
                return
            if (owner is None or session.owner == owner) and _evictable(session):
                self._end(session, SessionState.EVICTED, "capacity")

    def get(self, session_id: str, owner: str | None) -> Session:
        """The live session ``session_id`` of ``owner``; 404 for anyone else's."""
        session = self.lookup(session_id)
        if session is None or session.owner != owner:
            if session is None and session_id in self._expired:
                raise SessionExpired(session_id, self.idle_ttl_s)
            unloaded = self._unloaded.get(session_id) if session is None else None
            if unloaded is not None and unloaded[0] == owner:
                raise unloaded[1].error(session_id)
            raise SessionNotFound(session_id)
        return session

    def cached(self) -> list[Session]:
        return list(self._sessions.values())

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
                self._end(session, self._idle_end)
                expired += 1
        return expired

    def _idle_too_long(self, session: Session, now: float) -> bool:
        return (
            self.idle_ttl_s > 0
            and session.state is SessionState.OPEN
            and not session.lock.locked()
            and now - session.last_used > self.idle_ttl_s
        )

    def _end(self, session: Session, state: SessionState, reason: str = "idle") -> None:
        session.state = state
        del self._sessions[session.id]
        session.model.pool.release(session.slot)
        self._ended(session)
        if state is not SessionState.CLOSED:
            self.evictions[reason] += 1
        if state is SessionState.EXPIRED:
            self._expired[session.id] = None
            if len(self._expired) > EXPIRED_IDS_REMEMBERED:
                self._expired.popitem(last=False)

    def _ended(self, session: Session) -> None:
        """Count a session out of its key's quota; tell ``on_end`` that it left this process
        (without a durable store, for good)."""
        if session.owner is not None:
            self._per_key[session.owner] -= 1
            if not self._per_key[session.owner]:
                del self._per_key[session.owner]
        if not self.durable:
            for listener in self.on_end:
                listener(session.id)

    def detach_model(self, model: ServedModel, why: UnloadedVersion) -> list[Session]:
        """Take the sessions of ``model`` (a version being unloaded) out of the lookup at once.

        Steps that already hold a session object finish; new requests no longer find the session:
        without a durable store they get ``why`` as a 404, with one the store keeps the session
        (another replica may serve its version). End each with ``end_detached`` once its steps
        are done.
        """
        detached = [s for s in self._sessions.values() if s.model is model]
        for session in detached:
            del self._sessions[session.id]
            if not self.durable:
                self._unloaded[session.id] = (session.owner, why)
        while len(self._unloaded) > EXPIRED_IDS_REMEMBERED:
            self._unloaded.popitem(last=False)
        return detached

    def end_detached(self, session: Session) -> None:
        """End a session taken out by ``detach_model``; a step still waiting looks it up again."""
        if session.state is not SessionState.EVICTED:
            session.state = SessionState.EVICTED
            session.model.pool.release(session.slot)
            self._ended(session)
            self.evictions["unloaded"] += 1

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


def _evictable(session: Session) -> bool:
    """Whether a durable store's session may leave memory now: idle, and no step waiting."""
    return session.state is SessionState.OPEN and not session.lock.locked()
