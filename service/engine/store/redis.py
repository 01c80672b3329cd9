"""The Redis session store: compare-and-set writes, pipelined per event-loop tick.

Each session is one hash ``<prefix>session:<id>`` with two fields: ``rev`` (the revision, for the
compare-and-set in Lua) and ``blob`` (``codec.encode``: header + raw float32 state). Every command
issued during one event-loop tick goes out in one pipeline: the steps of a batch resolve together,
so their writes share one round trip. Timeouts are short and there are no retries: when Redis is
unreachable a request fails at once with 503 and the client retries; redis-py reconnects on the
next command once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.engine.store import codec
from service.engine.store.base import SessionRecord, StoreStats
from service.engine.store.errors import (
    CorruptRecord,
    SessionConflict,
    StoredSessionUnreadable,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

# KEYS[1] session key; ARGV expected revision ("0": must not exist), new revision, blob, ttl ms.
# Returns 0 when written, -1 when the session is gone, else the revision found.
SAVE = """
local rev = redis.call('HGET', KEYS[1], 'rev')
if ARGV[1] == '0' then
  if rev then return tonumber(rev) end
elseif not rev then
  return -1
elseif rev ~= ARGV[1] then
  return tonumber(rev)
end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'blob', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return 0
"""

# KEYS[1] session key; ARGV[1] the revision the caller holds. Returns nil when gone, {rev} when
# unchanged, {rev, blob} otherwise (the state travels only when it changed).
LOAD = """
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev then return false end
if rev == ARGV[1] then return {rev} end
return {rev, redis.call('HGET', KEYS[1], 'blob')}
"""


# KEYS[1] sequence key; ARGV[1] session id. Deletes the key only if it still maps to that id.
DROP_SEQUENCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class _Pending:
    args: tuple[Any, ...]
    future: asyncio.Future[Any] = field(repr=False)


class RedisStore:
    """Sessions in Redis, shared by every replica pointing at the same URL and prefix."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, idle_ttl_s: float) -> None:
        self.stats = StoreStats()
        self._where = _public_address(url)
        self._prefix = prefix
        self._ttl_ms = round(idle_ttl_s * 1000)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._pending: list[_Pending] = []
        self._flush: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check Redis once; the service starts anyway and answers 503 until Redis is back."""
        try:
            await self._client.ping()
            logger.info("session store: Redis at %s", self._where)
        except RedisError as exc:
            logger.warning("session store: Redis at %s unreachable for now: %s", self._where, exc)

    async def close(self) -> None:
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        await self._client.aclose()

    async def load(self, session_id: str, known_revision: int) -> SessionRecord | int | None:
        reply = await self._call("EVAL", LOAD, 1, self._key(session_id), known_revision)
        if reply is None:
            return None
        if len(reply) == 1:
            return known_revision
        try:
            return codec.decode(reply[1])
        except CorruptRecord as exc:
            raise StoredSessionUnreadable(session_id, str(exc)) from None

    async def save(self, record: SessionRecord) -> None:
        expected = record.revision - 1
        key, blob = self._key(record.session_id), codec.encode(record)
        found = await self._call(
            "EVAL", SAVE, 1, key, expected, record.revision, blob, self._ttl_ms
        )
        if found != 0:
            self.stats.conflicts += 1
            raise SessionConflict(record.session_id, expected, None if found == -1 else found)

    async def delete(self, session_id: str) -> None:
        await self._call("DEL", self._key(session_id))

    async def touch(self, session_ids: list[str]) -> None:
        if self._ttl_ms > 0 and session_ids:
            await asyncio.gather(
                *(self._call("PEXPIRE", self._key(sid), self._ttl_ms) for sid in session_ids)
            )

    async def get_sequence(self, key: str) -> str | None:
        name = self._sequence_key(key)
        if self._ttl_ms > 0:
            value = await self._call("GETEX", name, "PX", self._ttl_ms)
        else:
            value = await self._call("GET", name)
        return None if value is None else value.decode()

    async def put_sequence(self, key: str, session_id: str) -> None:
        name = self._sequence_key(key)
        if self._ttl_ms > 0:
            await self._call("SET", name, session_id, "PX", self._ttl_ms)
        else:
            await self._call("SET", name, session_id)

    async def drop_sequence(self, key: str, session_id: str) -> None:
        await self._call("EVAL", DROP_SEQUENCE, 1, self._sequence_key(key), session_id)

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}session:{session_id}"

    def _sequence_key(self, key: str) -> str:
        return f"{self._prefix}sequence:{key}"

    async def _call(self, *args: Any) -> Any:
        """Queue one command for this tick's pipeline and wait for its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(args, future))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._send(), name="redis pipeline")
        return await future

    async def _send(self) -> None:
        """Send what is queued in one pipeline; what queues meanwhile goes in the next one."""
        while self._pending:
            batch, self._pending = self._pending, []
            await self._send_batch(batch)

    async def _send_batch(self, batch: list[_Pending]) -> None:
        self.stats.pipelines += 1
        self.stats.commands += len(batch)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for command in batch:
                    pipe.execute_command(*command.args)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.stats.unavailable += 1
            _fail(batch, StoreUnavailable(self._where, str(exc) or type(exc).__name__))
            return
        except BaseException as exc:  # cancelled on shutdown: nobody may wait forever
            _fail(batch, StoreUnavailable(self._where, f"interrupted: {exc!r}"))
            raise
        for command, reply in zip(batch, replies, strict=True):
            if not command.future.done():
                command.future.set_result(reply)


def _fail(batch: list[_Pending], error: Exception) -> None:
    for command in batch:
        if not command.future.done():
            command.future.set_exception(error)


def _public_address(url: str) -> str:
    """``host:port/db`` of a Redis URL, without the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"
