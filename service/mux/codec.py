"""The binary frames of ``/v1/mux`` (docs/reference/mux.md is the specification).

Every number is little-endian; arrays follow the 24-byte header with no padding, in the order
below, which keeps each array aligned to its own element size.

Step request (client to server)::

    magic "RNM1" | kind u8 = 1 | flags u8 | reserved u16 = 0 | K u32 | T u32 | n u32 | id u32
    expected step counts int64[K]   (only when flags bit 0 is set)
    handles int32[K]
    inputs float32[K][T][n]

Step reply (server to client)::

    magic "RNR1" | kind u8 = 1 | flags u8 | reserved u16 = 0 | K u32 | T u32 | o u32 | id u32
    step counts int64[K]            (after the frame; -1 where the handle names no session)
    outputs float32[K][T][o]        (NaN for entries that failed)
    status uint8[K]                 (0 = ok; see ``service.engine.groups.EntryStatus``)
    messages: UTF-8 JSON {"<entry index>": "<message>"}   (only when flags bit 0 is set)

This module needs only numpy and the standard library, so clients can use it too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import orjson

REQUEST_MAGIC, REPLY_MAGIC = b"RNM1", b"RNR1"
KIND_STEP = 1
FLAG_EXPECTED = 1  # request: expected step counts follow the header
FLAG_MESSAGES = 1  # reply: messages follow the status array
HEADER = struct.Struct("<4sBBHIIII")  # magic, kind, flags, reserved, K, T, n or o, request id

I32, I64, F32, U8 = np.dtype("<i4"), np.dtype("<i8"), np.dtype("<f4"), np.dtype("u1")


class FrameError(ValueError):
    """A frame that cannot be read as a whole; ``request_id`` is known once the header is."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass
class StepFrame:
    """A step request: ``inputs`` (K, T, n) for the sessions under ``handles`` (K,)."""

    handles: npt.NDArray[np.int32]
    inputs: npt.NDArray[np.float32]
    expected: npt.NDArray[np.int64] | None = None  # (K,) expected step counts
    request_id: int = 0


@dataclass
class StepReply:
    """A step reply: per entry the status (K,), step count (K,) and outputs (K, T, o)."""

    status: npt.NDArray[np.uint8]
    step_counts: npt.NDArray[np.int64]
    outputs: npt.NDArray[np.float32]
    messages: dict[int, str] = field(default_factory=dict)
    request_id: int = 0


def encode_step(frame: StepFrame) -> bytes:
    k, steps, n = frame.inputs.shape
    flags = 0 if frame.expected is None else FLAG_EXPECTED
    parts = [HEADER.pack(REQUEST_MAGIC, KIND_STEP, flags, 0, k, steps, n, frame.request_id)]
    if frame.expected is not None:
        parts.append(np.ascontiguousarray(frame.expected, I64).tobytes())
    parts.append(np.ascontiguousarray(frame.handles, I32).tobytes())
    parts.append(np.ascontiguousarray(frame.inputs, F32).tobytes())
    return b"".join(parts)


def decode_step(data: bytes, max_entries: int, max_steps: int) -> StepFrame:
    """Read a step request; raise ``FrameError`` naming what is wrong with it."""
    if len(data) < HEADER.size:
        raise FrameError(f"a step frame needs a {HEADER.size}-byte header, got {len(data)} bytes")
    magic, kind, flags, _, k, steps, n, request_id = HEADER.unpack_from(data)
    if magic != REQUEST_MAGIC or kind != KIND_STEP:
        raise FrameError(f"not a step frame: magic {magic!r}, kind {kind} (expected 'RNM1', 1)")
    if not 1 <= k <= max_entries:
        raise FrameError(f"a frame carries 1 to {max_entries} entries, not {k}", request_id)
    if not 1 <= steps <= max_steps or n < 1:
        raise FrameError(
            f"each entry carries 1 to {max_steps} steps of at least 1 input, not {steps} x {n}",
            request_id,
        )
    has_expected = bool(flags & FLAG_EXPECTED)
    size = HEADER.size + (8 * k if has_expected else 0) + 4 * k + 4 * k * steps * n
    if len(data) != size:
        raise FrameError(
            f"the header announces {k} entries of {steps} x {n} inputs"
            f"{' with expected step counts' if has_expected else ''}: {size} bytes, but the "
            f"frame has {len(data)}",
            request_id,
        )
    offset = HEADER.size
    expected = None
    if has_expected:
        expected = np.frombuffer(data, I64, k, offset)
        offset += 8 * k
    handles = np.frombuffer(data, I32, k, offset)
    inputs = np.frombuffer(data, F32, k * steps * n, offset + 4 * k).reshape(k, steps, n)
    return StepFrame(handles, inputs, expected, request_id)


def encode_reply(reply: StepReply) -> bytes:
    k, steps, o = reply.outputs.shape
    flags = FLAG_MESSAGES if reply.messages else 0
    parts = [
        HEADER.pack(REPLY_MAGIC, KIND_STEP, flags, 0, k, steps, o, reply.request_id),
        np.ascontiguousarray(reply.step_counts, I64).tobytes(),
        np.ascontiguousarray(reply.outputs, F32).tobytes(),
        np.ascontiguousarray(reply.status, U8).tobytes(),
    ]
    if reply.messages:
        parts.append(orjson.dumps({str(i): m for i, m in reply.messages.items()}))
    return b"".join(parts)


def decode_reply(data: bytes) -> StepReply:
    if len(data) < HEADER.size:
        raise FrameError(f"a reply needs a {HEADER.size}-byte header, got {len(data)} bytes")
    magic, kind, flags, _, k, steps, o, request_id = HEADER.unpack_from(data)
    if magic != REPLY_MAGIC or kind != KIND_STEP:
        raise FrameError(f"not a step reply: magic {magic!r}, kind {kind}")
    offset = HEADER.size
    counts = np.frombuffer(data, I64, k, offset)
    offset += 8 * k
    outputs = np.frombuffer(data, F32, k * steps * o, offset).reshape(k, steps, o)
    offset += 4 * k * steps * o
    status = np.frombuffer(data, U8, k, offset)
    messages: dict[int, str] = {}
    if flags & FLAG_MESSAGES:
        messages = {int(i): str(m) for i, m in orjson.loads(data[offset + k :]).items()}
    return StepReply(status, counts, outputs, messages, request_id)
