"""Which session carries each open V2 sequence, kept where sessions live.

Triton's sequence extension names a stream by a ``sequence_id`` that the client chooses; the
service runs each sequence as a session. The map from a sequence's key (the caller's key hash,
the model and the id) to its session id lives beside the sessions: in this process with the
memory store, where an entry goes when its session ends; in Redis with the Redis store, where
any replica continues any sequence and an entry expires with the idle TTL, refreshed on every
request of its sequence. ``SequenceLocks`` orders the requests of one sequence in this process.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol

from service.engine.sessions import SessionManager
from service.engine.store.base import SessionStore

ENDED_REMEMBERED = 10_000  # ended sequences that still answer why (ids are at most 256 bytes)


class SequenceMap(Protocol):
    """Sequence keys to session ids."""

    async def get(self, key: str) -> str | None:
        """The session of the sequence ``key``, or None (refreshing the entry's expiry)."""
        ...

    async def put(self, key: str, session_id: str) -> None: ...

    async def drop(self, key: str, session_id: str) -> None:
        """Forget ``key`` if it still maps to ``session_id``."""
        ...


class MemorySequences:
    """The map in this process. When a session ends (close, expiry, unload), its entry moves to a
    short, bounded memory of ended sequences, so that a late request of the sequence learns why
    (expired, unloaded...) rather than only that it is unknown."""

    def __init__(self, sessions: SessionManager) -> None:
        self._sessions: dict[str, str] = {}  # sequence key -> session id
        self._keys: dict[str, str] = {}  # session id -> sequence key
        self._ended: OrderedDict[str, str] = OrderedDict()  # recently ended, oldest first
        sessions.on_end.append(self._session_ended)

    def __len__(self) -> int:
        """Open sequences (those whose sessions live)."""
        return len(self._sessions)

    async def get(self, key: str) -> str | None:
        return self._sessions.get(key) or self._ended.get(key)

    async def put(self, key: str, session_id: str) -> None:
        old = self._sessions.get(key)
        if old is not None:
            self._keys.pop(old, None)
        self._ended.pop(key, None)
        self._sessions[key] = session_id
        self._keys[session_id] = key

    async def drop(self, key: str, session_id: str) -> None:
        if self._sessions.get(key) == session_id:
            del self._sessions[key]
            self._keys.pop(session_id, None)
        if self._ended.get(key) == session_id:
            del self._ended[key]

    def _session_ended(self, session_id: str) -> None:
        key = self._keys.pop(session_id, None)
        if key is None or self._sessions.get(key) != session_id:
            return
        del self._sessions[key]
        self._ended[key] = session_id
        while len(self._ended) > ENDED_REMEMBERED:
            self._ended.popitem(last=False)


class StoredSequences:
    """The map in the durable store, shared by every replica."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    async def get(self, key: str) -> str | None:
        return await self._store.get_sequence(key)

    async def put(self, key: str, session_id: str) -> None:
        await self._store.put_sequence(key, session_id)

    async def drop(self, key: str, session_id: str) -> None:
        await self._store.drop_sequence(key, session_id)


class SequenceLocks:
    """One lock per sequence key, held while a request of that sequence runs; a lock lives only
    while a request holds or waits for it. ``async with locks.hold(key):`` (a plain context
    manager object: it runs on every request of a sequence)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def hold(self, key: str) -> _Held:
        return _Held(self._locks, key)


class _Held:
    """Holding the lock of one sequence key, counted so the lock goes with its last user."""

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key) or (asyncio.Lock(), 0)
        self._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave(release=False)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave(release=True)

    def _leave(self, release: bool) -> None:
        lock, users = self._locks[self._key]
        if release:
            lock.release()
        if users == 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)
