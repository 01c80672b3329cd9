"""Build the store the settings ask for."""

from __future__ import annotations

from service.engine.store.base import SessionStore
from service.engine.store.redis import RedisStore
from service.settings import Settings


def make_store(settings: Settings) -> SessionStore | None:
    """The durable store, or None for ``memory`` (sessions live in this process only)."""
    if settings.session_store == "memory":
        return None
    return RedisStore(
        settings.redis_url,
        prefix=settings.redis_key_prefix,
        timeout_s=settings.redis_timeout_s,
        idle_ttl_s=settings.idle_ttl_s,
    )
