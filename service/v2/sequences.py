"""Triton's sequence extension on top of the service's sessions.

A V2 sequence is a ``/v1`` session: ``sequence_start`` creates one (or restarts the sequence on a
new session), later requests step it, ``sequence_end`` deletes it after its step. The map from
``(caller, model, sequence_id)`` to the session id lives where sessions live
(``service.engine.sequences``): with the Redis store any replica continues any sequence. Ids are
scoped per API key and per model, and at most ``MAX_ID_BYTES`` long. Requests of one sequence run
one at a time, in arrival order (in this process). The session runs through the same batcher,
limits and TTL as any other, and its id is returned in the response parameters so it can be
inspected at ``GET /v1/sessions/{id}``. ``expected_step_count`` (a request parameter) makes a
retried request safe, as on ``/v1``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from service.engine.dataplane import DataPlane, StepOutput
from service.engine.errors import BadRequest, NotFound, ServiceError
from service.engine.sequences import SequenceLocks, SequenceMap
from service.engine.state_pool import FloatArray
from service.engine.store.base import owner_hash

SequenceId = int | str
UINT64_MAX = (1 << 64) - 1
MAX_ID_BYTES = 256


@dataclass(frozen=True)
class SequenceFlags:
    """The sequence parameters of one request; ``id`` is None for a stateless request."""

    id: SequenceId | None
    start: bool
    end: bool
    expected: int | None = None  # the step count the session must be at, if given

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> SequenceFlags:
        raw = parameters.get("sequence_id", 0)
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise BadRequest(
                f"sequence_id must be an unsigned integer or a string, got {raw!r:.60}"
            )
        if isinstance(raw, int) and not 0 <= raw <= UINT64_MAX:
            raise BadRequest(f"sequence_id {raw} is outside the uint64 range")
        if isinstance(raw, str) and len(raw.encode()) > MAX_ID_BYTES:
            raise BadRequest(
                f"sequence_id is {len(raw.encode())} bytes long; at most {MAX_ID_BYTES} are allowed"
            )
        start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
        for name, value in (("sequence_start", start), ("sequence_end", end)):
            if not isinstance(value, bool):
                raise BadRequest(f"{name} must be true or false, got {value!r:.60}")
        expected = parameters.get("expected_step_count")
        if expected is not None and (type(expected) is not int or expected < 0):
            raise BadRequest(f"expected_step_count must be an integer >= 0, got {expected!r:.60}")
        sequence_id = None if raw in (0, "") else raw
        if sequence_id is None and (start or end or expected is not None):
            raise BadRequest(
                "sequence_start, sequence_end and expected_step_count need a non-zero sequence_id"
            )
        return cls(sequence_id, start, end, expected)


def _missing_start(sequence_id: SequenceId, model: str) -> BadRequest:
    # Triton's own wording, so that clients written against Triton recognise it.
    return BadRequest(
        f"inference request for sequence {sequence_id} to model '{model}' must specify the "
        "START flag on the first request of the sequence"
    )


@dataclass(frozen=True)
class _Sequence:
    """One sequence as the table sees it: who asked, for which model, and its map key."""

    owner: str | None
    model: str
    id: SequenceId
    key: str = ""

    @classmethod
    def of(cls, owner: str | None, model: str, sequence_id: SequenceId) -> _Sequence:
        kind = "i" if isinstance(sequence_id, int) else "s"
        key = f"{owner_hash(owner)}:{model}:{kind}:{sequence_id}"
        return cls(owner, model, sequence_id, key)


class SequenceTable:
    """Which session carries each open V2 sequence, and the order of each one's requests."""

    def __init__(self, sessions: SequenceMap) -> None:
        self.map = sessions  # sequence keys to session ids, where sessions live
        self._locks = SequenceLocks()

    async def step(
        self,
        dataplane: DataPlane,
        flags: SequenceFlags,
        owner: str | None,
        model: str,
        version: int | None,
        inputs: FloatArray,
    ) -> tuple[str, StepOutput]:
        """Run one chunk of a sequence; returns the session id and the step's result.

        A request that fails leaves the map and every session as they were: a restart builds
        the new session first and drops the old one only once the new one has stepped.
        """
        assert flags.id is not None
        sequence = _Sequence.of(owner, model, flags.id)
        async with self._locks.hold(sequence.key):
            if flags.start:
                session_id, output = await self._start(dataplane, sequence, version, inputs, flags)
            else:
                session_id = await self._existing(dataplane, sequence, version)
                output = await self._continue(dataplane, sequence, session_id, inputs, flags)
            if flags.end:
                await self.map.drop(sequence.key, session_id)
                await _delete_quietly(dataplane, session_id, owner)
        return session_id, output

    async def _start(
        self,
        dataplane: DataPlane,
        sequence: _Sequence,
        version: int | None,
        inputs: FloatArray,
        flags: SequenceFlags,
    ) -> tuple[str, StepOutput]:
        owner = sequence.owner
        session_id = (await dataplane.create_session(sequence.model, version, owner)).session_id
        try:
            output = await dataplane.step(
                session_id, inputs, owner, expected_step_count=flags.expected
            )
            old = await self.map.get(sequence.key)
            await self.map.put(sequence.key, session_id)
        except ServiceError:
            await _delete_quietly(dataplane, session_id, owner)
            raise
        if old is not None and old != session_id:
            await _delete_quietly(dataplane, old, owner)
        return session_id, output

    async def _existing(
        self, dataplane: DataPlane, sequence: _Sequence, version: int | None
    ) -> str:
        session_id = await self.map.get(sequence.key)
        if session_id is None:
            raise _missing_start(sequence.id, sequence.model)
        if version is not None:
            try:
                started_on = (await dataplane.session_info(session_id, sequence.owner)).version
            except NotFound:
                await self.map.drop(sequence.key, session_id)
                raise
            if started_on != version:
                raise BadRequest(
                    f"sequence {sequence.id} was started on version {started_on} of model "
                    f"'{sequence.model}', not version {version}"
                )
        return session_id

    async def _continue(
        self,
        dataplane: DataPlane,
        sequence: _Sequence,
        session_id: str,
        inputs: FloatArray,
        flags: SequenceFlags,
    ) -> StepOutput:
        try:
            return await dataplane.step(
                session_id, inputs, sequence.owner, expected_step_count=flags.expected
            )
        except NotFound:
            # The session expired or was deleted through /v1: the sequence is gone with it.
            await self.map.drop(sequence.key, session_id)
            raise


async def _delete_quietly(dataplane: DataPlane, session_id: str, owner: str | None) -> None:
    with contextlib.suppress(NotFound):
        await dataplane.delete(session_id, owner)
