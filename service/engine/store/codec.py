"""The stored form of a session: ``RNS1``, a 2-byte header length, a JSON header, raw float32.

A 2-layer hidden-256 GRU state is 2 KiB of float32 plus a header of about 200 bytes.
"""

from __future__ import annotations

import struct

import numpy as np
import orjson

from service.engine.store.base import SessionRecord
from service.engine.store.errors import CorruptRecord

MAGIC = b"RNS1"
_LENGTH = struct.Struct("<H")


def encode(record: SessionRecord) -> bytes:
    state = np.ascontiguousarray(record.state, dtype="<f4")  # (S, L, m)
    header = orjson.dumps(
        {
            "session_id": record.session_id,
            "model": record.model,
            "version": record.version,
            "step_count": record.step_count,
            "revision": record.revision,
            "owner": record.owner_hash,
            "created_at": record.created_at,
            "shape": list(state.shape),
        }
    )
    return MAGIC + _LENGTH.pack(len(header)) + header + state.tobytes()


def decode(blob: bytes) -> SessionRecord:
    if blob[:4] != MAGIC or len(blob) < 6:
        raise CorruptRecord(f"not a session record (starts with {blob[:4]!r})")
    (length,) = _LENGTH.unpack_from(blob, 4)
    try:
        header = orjson.loads(blob[6 : 6 + length])
        shape = tuple(int(n) for n in header["shape"])
        state = np.frombuffer(blob, dtype="<f4", offset=6 + length).astype(np.float32)
        return SessionRecord(
            session_id=str(header["session_id"]),
            model=str(header["model"]),
            version=int(header["version"]),
            step_count=int(header["step_count"]),
            revision=int(header["revision"]),
            owner_hash=str(header["owner"]),
            created_at=float(header["created_at"]),
            state=state.reshape(shape),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptRecord(f"unreadable session record: {exc}") from None
