"""Session store backends: where session states live beyond one process.

``memory`` (the default) keeps every session in this process's state pool and needs nothing else
(``make_store`` returns None). ``redis`` writes each acknowledged step's state to Redis before the
response goes out, so any replica can continue any session and a restart loses nothing.
"""

from __future__ import annotations

from service.engine.store.base import SessionRecord, SessionStore, StoreStats
from service.engine.store.errors import SessionConflict, SessionModelNotServed, StoreUnavailable
from service.engine.store.factory import make_store

__all__ = [
    "SessionConflict",
    "SessionModelNotServed",
    "SessionRecord",
    "SessionStore",
    "StoreStats",
    "StoreUnavailable",
    "make_store",
]
