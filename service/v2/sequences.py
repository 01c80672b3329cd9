"""Triton's sequence extension on top of the service's sessions.

A V2 sequence is a ``/v1`` session: ``sequence_start`` creates one (or restarts the sequence on a
new session), later requests step it, ``sequence_end`` deletes it after its step. The table maps
``(caller, model, sequence_id)`` to the session id, so ids are scoped per API key and per model.
The session runs through the same batcher, limits and TTL as any other, and its id is returned in
the response parameters so it can be inspected at ``GET /v1/sessions/{id}``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from service.engine.dataplane import DataPlane, StepOutput
from service.engine.errors import BadRequest, NotFound, ServiceError
from service.engine.state_pool import FloatArray

SequenceId = int | str
UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class SequenceFlags:
    """The sequence parameters of one request; ``id`` is None for a stateless request."""

    id: SequenceId | None
    start: bool
    end: bool

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> SequenceFlags:
        raw = parameters.get("sequence_id", 0)
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise BadRequest(f"sequence_id must be an unsigned integer or a string, got {raw!r}")
        if isinstance(raw, int) and not 0 <= raw <= UINT64_MAX:
            raise BadRequest(f"sequence_id {raw} is outside the uint64 range")
        start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
        for name, value in (("sequence_start", start), ("sequence_end", end)):
            if not isinstance(value, bool):
                raise BadRequest(f"{name} must be true or false, got {value!r}")
        sequence_id = None if raw in (0, "") else raw
        if sequence_id is None and (start or end):
            raise BadRequest("sequence_start and sequence_end need a non-zero sequence_id")
        return cls(sequence_id, start, end)


def _missing_start(sequence_id: SequenceId, model: str) -> BadRequest:
    # Triton's own wording, so that clients written against Triton recognise it.
    return BadRequest(
        f"inference request for sequence {sequence_id} to model '{model}' must specify the "
        "START flag on the first request of the sequence"
    )


Key = tuple[str | None, str, SequenceId]


class SequenceTable:
    """Which session carries each open V2 sequence."""

    def __init__(self) -> None:
        self._sessions: dict[Key, str] = {}

    def __len__(self) -> int:
        return len(self._sessions)

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

        A request that fails leaves the table and every session as they were: a restart builds
        the new session first and drops the old one only once the new one has stepped.
        """
        assert flags.id is not None
        key: Key = (owner, model, flags.id)
        if flags.start:
            session_id, output = await self._start(dataplane, key, version, inputs)
        else:
            session_id = await self._existing(dataplane, key, version)
            output = await self._continue(dataplane, key, session_id, inputs)
        if flags.end:
            del self._sessions[key]
            await _delete_quietly(dataplane, session_id, owner)
        return session_id, output

    async def _start(
        self, dataplane: DataPlane, key: Key, version: int | None, inputs: FloatArray
    ) -> tuple[str, StepOutput]:
        owner = key[0]
        session_id = (await dataplane.create_session(key[1], version, owner)).session_id
        try:
            output = await dataplane.step(session_id, inputs, owner)
        except ServiceError:
            await _delete_quietly(dataplane, session_id, owner)
            raise
        old = self._sessions.get(key)
        self._sessions[key] = session_id
        if old is not None:
            await _delete_quietly(dataplane, old, owner)
        return session_id, output

    async def _existing(self, dataplane: DataPlane, key: Key, version: int | None) -> str:
        session_id = self._sessions.get(key)
        if session_id is None:
            raise _missing_start(key[2], key[1])
        if version is not None:
            try:
                started_on = (await dataplane.session_info(session_id, key[0])).version
            except NotFound:
                self._sessions.pop(key, None)
                raise
            if started_on != version:
                raise BadRequest(
                    f"sequence {key[2]} was started on version {started_on} of model "
                    f"'{key[1]}', not version {version}"
                )
        return session_id

    async def _continue(
        self, dataplane: DataPlane, key: Key, session_id: str, inputs: FloatArray
    ) -> StepOutput:
        try:
            return await dataplane.step(session_id, inputs, key[0])
        except NotFound:
            # The session expired or was deleted through /v1: the sequence is gone with it.
            self._sessions.pop(key, None)
            raise


async def _delete_quietly(dataplane: DataPlane, session_id: str, owner: str | None) -> None:
    with contextlib.suppress(NotFound):
        await dataplane.delete(session_id, owner)
