"""The protocol-agnostic data plane: everything the REST, websocket and V2 layers call.

Protocol layers translate requests into these calls and results back; they hold no logic. Inputs
arrive as decoded JSON values (nested lists) or numpy arrays; results are numpy arrays.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from service.engine import inputs
from service.engine.batcher import ChunkResult
from service.engine.errors import (
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    SessionHeld,
    SessionTakenOver,
    StepCountMismatch,
)
from service.engine.metrics import Metrics
from service.engine.models import ModelRepository, ServedModel
from service.engine.runtime import FloatArray
from service.engine.sessions import LIVE, Session, SessionManager, SessionState
from service.engine.state_pool import SlotArray
from service.engine.store import SessionModelNotServed, SessionRecord, SessionStore
from service.engine.store.base import owner_hash
from service.engine.store.errors import (
    OutcomeUnknown,
    SessionBusy,
    SessionConflict,
    StoredSessionNotFound,
    StoredSessionUnreadable,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StreamGroupLike(Protocol):
    """What the data plane needs of a mux stream's group: whether a frame of it is running."""

    busy: bool


EVICTED_RETRIES = 3  # a step whose session is dropped from memory while it waits reloads it


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    model: str
    version: int
    state: SessionState
    step_count: int
    created_at: float
    idle_s: float

    @classmethod
    def of(cls, session: Session, now: float) -> SessionInfo:
        return cls(
            session_id=session.id,
            model=session.model.name,
            version=session.model.version,
            state=session.state,
            step_count=session.current_step_count,
            created_at=session.created_at,
            idle_s=max(0.0, now - session.last_used),
        )


@dataclass(frozen=True)
class StepOutput:
    outputs: FloatArray  # (T, o)
    step_count: int
    chunk: ChunkResult = field(repr=False)

    @property
    def state(self) -> FloatArray:
        """The session's state after the chunk (S, L, m), copied out of the batch on use."""
        return self.chunk.state


@dataclass(frozen=True)
class SequenceOutput:
    outputs: FloatArray  # (T, o)
    state: FloatArray  # (S, L, m): the state after the last step


class DataPlane:
    """Models, predictions and sessions, independent of any protocol.

    Caller identity is the ``owner`` argument (the API key, or None without authentication).
    With a durable ``store`` (Redis), ``sessions`` is a cache of it: a session is loaded on first
    touch, refreshed when another replica advanced it, and every change is stored before the
    call returns.
    """

    def __init__(
        self,
        sessions: SessionManager,
        max_steps_per_chunk: int,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.max_steps_per_chunk = max_steps_per_chunk
        self.store = store
        self.metrics = metrics or Metrics()
        self.groups: set[StreamGroupLike] = set()  # the open mux streams (service.engine.groups)
        self._keepalive: asyncio.Task[None] | None = None
        self._repository: ModelRepository | None = None

    # -- models -----------------------------------------------------------------------------
    def set_repository(self, repository: ModelRepository) -> None:
        self._repository = repository

    def served_models(self) -> list[ServedModel]:
        return list(self._repository or [])

    @property
    def ready(self) -> bool:
        return self._repository is not None and bool(self._repository)

    @property
    def repository(self) -> ModelRepository:
        if self._repository is None or not self.ready:
            raise NotReady()
        return self._repository

    def list_models(self) -> list[dict[str, Any]]:
        return [model.describe() for model in self.repository]

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        return [model.describe() for model in self.repository.versions(name)]

    def model(self, name: str, version: int | None = None) -> ServedModel:
        return self.repository.get(name, version)

    # -- stateless prediction ---------------------------------------------------------------
    async def predict(
        self,
        name: str,
        sequences: list[Any],
        *,
        version: int | None = None,
        initial_states: list[FloatArray] | None = None,
    ) -> tuple[ServedModel, list[SequenceOutput]]:
        """Run whole sequences (each (T, n), ragged allowed) from zero or given states (S, L, m)."""
        with self.metrics.track("predict"):
            return await self._predict(name, sequences, version, initial_states)

    async def _predict(
        self,
        name: str,
        sequences: list[Any],
        version: int | None,
        initial_states: list[FloatArray] | None,
    ) -> tuple[ServedModel, list[SequenceOutput]]:
        model = self.model(name, version)
        if not isinstance(sequences, list) or not sequences:
            raise InvalidInput("'inputs' must be a non-empty list of sequences")
        if initial_states is not None and len(initial_states) != len(sequences):
            raise InvalidInput(
                f"{len(initial_states)} initial states for {len(sequences)} sequences"
            )
        arrays = [
            self.parse_chunk(model, seq, f"inputs[{i}]", allow_flat=False)
            for i, seq in enumerate(sequences)
        ]
        starts: list[FloatArray | None] = [None] * len(arrays)
        if initial_states is not None:
            starts = list(initial_states)
        futures = [
            model.batcher.submit(x, initial_state=s) for x, s in zip(arrays, starts, strict=True)
        ]
        results: list[ChunkResult] = await asyncio.gather(*futures)
        return model, [SequenceOutput(r.y, r.state) for r in results]

    def parse_state(self, model: ServedModel, raw: Any, where: str) -> FloatArray:
        """Read one initial state: ``{state_input_name: [[...] per layer]}``, each (L, m)."""
        meta = model.metadata
        if not isinstance(raw, dict) or set(raw) != set(meta.state_inputs):
            raise InvalidInput(f"{where} must be an object with keys {meta.state_inputs}")
        layers = [
            inputs.finite_matrix(raw[name], f"{where}.{name}", meta.num_layers, meta.hidden_size)
            for name in meta.state_inputs
        ]
        return np.stack(layers)  # (S, L, m)

    # -- sessions ---------------------------------------------------------------------------
    async def create_session(
        self, name: str, version: int | None, owner: str | None
    ) -> SessionInfo:
        """Open a session on a model version (default: the highest); with a durable store the
        session is written there before this returns."""
        with self.metrics.track("create_session"):
            session = self.sessions.create(self.model(name, version), owner)
            if self.store is not None:
                try:
                    await self.save(session, _zero_state(session.model))
                except ServiceError:
                    self.sessions.evict(session, "store")
                    raise
            return self._info(session)

    async def session_info(self, session_id: str, owner: str | None) -> SessionInfo:
        with self.metrics.track("session_info"):
            session = await self.find_session(session_id, owner)
            if session.holder is not None:  # its holder keeps it current
                return self._info(session)
            async with session.lock:
                await self.refresh(session)
                if self.store is not None:
                    await self.store.touch([session.id])  # reading it keeps it alive
                return self._info(session)

    async def step(
        self,
        session_id: str,
        inputs: Any,
        owner: str | None,
        attachment: int | None = None,
        *,
        expected_step_count: int | None = None,
    ) -> StepOutput:
        """Run one chunk (T, n) on a session; steps of one session run one at a time, in order.

        With ``attachment`` (a websocket), the step fails with 409 if another connection took over.
        With ``expected_step_count``, it fails with 409 (and the session's ``step_count``) unless
        the session is at exactly that count: a client that retries a step whose answer it never
        got cannot apply it twice. A rejected or failed step leaves the state and ``step_count``
        exactly as they were. With a durable store the new state is stored before this returns;
        if another replica advanced the session meanwhile the step fails with 409 and the stored
        state stands.
        """
        with self.metrics.track("step"):
            for _ in range(EVICTED_RETRIES):
                if self.store is None:  # no await: the session is in memory or nowhere
                    session = self.sessions.get(session_id, owner)
                else:
                    session = await self.find_session(session_id, owner)
                _check_not_held(session)
                x = self.parse_chunk(session.model, inputs, "inputs", allow_flat=True)
                async with session.lock:
                    if session.state is SessionState.EVICTED:
                        continue  # dropped from memory while we waited: load it again
                    self._check_live(session, attachment)
                    if self.store is None:  # the common case: one future, no extra task
                        _check_step_count(session, expected_step_count)
                        started = time.perf_counter()
                        result = await self._submit(session, x)  # not cancellable: StepFuture
                        return self._stepped(session, result, started)
                    task = asyncio.ensure_future(self._advance(session, x, expected_step_count))
                    return await _finish_even_if_cancelled(task)
            raise SessionBusy(session_id)

    async def _advance(
        self, session: Session, x: FloatArray, expected_step_count: int | None
    ) -> StepOutput:
        """Run the chunk from the current state and store the result (the session lock is held)."""
        assert self.store is not None
        started = time.perf_counter()
        await self.refresh(session)
        _check_step_count(session, expected_step_count)
        stored = session.step_count
        result = await self._submit(session, x)
        try:
            await self.save(session, result.state, stored_count=stored)
        except ServiceError:
            self.sessions.evict(session, "store")  # this copy is ahead of the store: drop it
            raise
        return self._stepped(session, result, started)

    def _stepped(self, session: Session, result: ChunkResult, started: float) -> StepOutput:
        """Record a finished step (begun at ``time.perf_counter()`` value ``started``)."""
        self.metrics.observe_step(session.model.name, session.model.version, started)
        return StepOutput(outputs=result.y, step_count=session.step_count, chunk=result)

    def _submit(self, session: Session, x: FloatArray) -> asyncio.Future[ChunkResult]:
        """Queue the chunk on the session's slot; its step count moves only if it succeeds.

        The future is a ``StepFuture``: a cancelled caller still waits for the chunk to run, so
        the session lock covers the slot until its new state is stored.
        """

        def stored() -> None:
            session.step_count += len(x)
            self.sessions.mark_used(session)

        return session.model.batcher.submit(x, slot=session.slot, on_success=stored)

    async def reset(self, session_id: str, owner: str | None) -> SessionInfo:
        """Zero the session's state and step count."""
        with self.metrics.track("reset"):
            session = await self.find_session(session_id, owner)
            _check_not_held(session)
            async with session.lock:
                session.require(*LIVE)
                await self.refresh(session)
                await self.zero(session)
                session.step_count = 0
                self.sessions.mark_used(session)
                return self._info(session)

    async def zero(self, session: Session) -> None:
        """Zero the session's state: stored first (durable store), then in its pool slot. The
        caller holds the session and sets its step count to 0."""
        if self.store is not None:
            await self.save(session, _zero_state(session.model), step_count=0)
        session.model.pool.reset(session.slot)

    async def delete(self, session_id: str, owner: str | None) -> None:
        with self.metrics.track("delete"):
            session = await self.find_session(session_id, owner)
            _check_not_held(session)
            async with session.lock:
                session.require(*LIVE)
                if self.store is not None:
                    await self.store.delete(session.id)
                self.sessions.close(session)

    async def attach(self, session_id: str, owner: str | None) -> tuple[SessionInfo, int]:
        """Attach a streaming connection; returns the attachment id to pass to ``step``.

        A session held by a mux stream is taken over: the stream lets go of it once its frame in
        flight has run, and this attach waits for that.
        """
        with self.metrics.track("attach"):
            session = await self.find_session(session_id, owner)
            if session.holder is not None:
                session.holder.surrender(session)
            async with session.lock:
                await self.refresh(session)
                attachment = self.sessions.attach(session)
                return self._info(session), attachment

    def detach(self, session_id: str, attachment: int) -> None:
        """Mark the session idle again (it lives on for resume until its TTL)."""
        session = self.sessions.get_any(session_id)
        if session is not None:
            self.sessions.detach(session, attachment)

    def start_keepalive(self) -> None:
        """With a durable store and an idle TTL: keep attached sessions alive in the store."""
        if self.store is not None and self.sessions.idle_ttl_s > 0:
            self._keepalive = asyncio.create_task(self._keep_attached_alive(), name="keepalive")

    async def stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)

    async def _keep_attached_alive(self) -> None:
        """Restart the stored TTL of every attached session a few times per TTL: a stream that
        is attached but quiet must not lose its session (writes restart it only when stepped)."""
        assert self.store is not None
        interval = min(max(self.sessions.idle_ttl_s / 3, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            attached = [s.id for s in self.sessions.cached() if s.state is SessionState.STREAMING]
            try:
                await self.store.touch(attached)
            except ServiceError as exc:  # Redis unreachable for now: the next round tries again
                logger.warning("could not refresh the TTL of attached sessions: %s", exc)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until no step is queued or running (for shutdown)."""
        deadline = time.monotonic() + timeout_s
        while any(m.batcher.queue_depth for m in self.served_models()) or self._steps_in_flight():
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)

    def _steps_in_flight(self) -> bool:
        """Whether a step runs: a locked session no stream holds, or a stream's frame."""
        cached = self.sessions.cached()
        return any(s.lock.locked() and s.holder is None for s in cached) or any(
            group.busy for group in self.groups
        )

    def _check_live(self, session: Session, attachment: int | None) -> None:
        if session.state is SessionState.STREAMING and attachment not in (None, session.attachment):
            raise SessionTakenOver(session.id)
        session.require(*LIVE)

    @staticmethod
    def _info(session: Session) -> SessionInfo:
        return SessionInfo.of(session, time.monotonic())

    # -- the durable store ------------------------------------------------------------------
    async def find_session(self, session_id: str, owner: str | None) -> Session:
        """The session from memory, or loaded from the durable store on first touch."""
        if self.store is None:
            return self.sessions.get(session_id, owner)
        session = self.sessions.lookup(session_id)
        if session is None:
            found = await self.store.load(session_id, known_revision=-1)
            if not isinstance(found, SessionRecord) or found.owner_hash != owner_hash(owner):
                raise StoredSessionNotFound(session_id, self.sessions.idle_ttl_s)
            session = self.sessions.lookup(session_id) or self._adopt(found, owner)
        if session.owner != owner:
            raise StoredSessionNotFound(session_id, self.sessions.idle_ttl_s)
        return session

    def _adopt(self, record: SessionRecord, owner: str | None) -> Session:
        model = self._model_of(record)
        session = self.sessions.adopt(model, record.session_id, owner)
        session.created_at = record.created_at
        self._apply(session, record)
        return session

    async def refresh(self, session: Session) -> None:
        """Bring this copy up to the stored revision (another replica may have advanced it)."""
        if self.store is None:
            return
        found = await self.store.load(session.id, known_revision=session.revision)
        if found is None:
            self.sessions.evict(session, "deleted")
            raise StoredSessionNotFound(session.id, self.sessions.idle_ttl_s)
        if isinstance(found, SessionRecord):
            self._apply(session, found)

    def _apply(self, session: Session, record: SessionRecord) -> None:
        meta = session.model.metadata
        expected = (meta.num_states, meta.num_layers, meta.hidden_size)
        if record.state.shape != expected:
            raise StoredSessionUnreadable(
                session.id, f"state shape {record.state.shape}, the model expects {expected}"
            )
        session.model.pool.scatter(_slots(session), record.state[:, :, None, :])
        session.step_count = record.step_count
        session.revision = record.revision

    async def save(
        self,
        session: Session,
        state: FloatArray,
        step_count: int | None = None,
        stored_count: int | None = None,
    ) -> None:
        """Compare-and-set the session's next revision in the durable store.

        ``step_count`` is the count to store (default: the session's); ``stored_count`` the count
        the store holds now (default: the same), named in the error if the outcome is unknown.
        When the store does not confirm the write in time, its revision is read back: the step
        succeeds if the write was applied, and fails saying so if it was not, or may have been.
        """
        assert self.store is not None
        record = SessionRecord(
            session_id=session.id,
            model=session.model.name,
            version=session.model.version,
            step_count=session.step_count if step_count is None else step_count,
            revision=session.revision + 1,
            owner_hash=owner_hash(session.owner),
            created_at=session.created_at,
            state=state,  # (S, L, m)
        )
        try:
            await self.store.save(record)
        except StoreUnavailable as exc:
            known = record.step_count if stored_count is None else stored_count
            await self._settle(record, exc, known)
        session.revision = record.revision

    async def _settle(self, record: SessionRecord, error: StoreUnavailable, before: int) -> None:
        """After a write the store did not confirm, read back whether it was applied.

        Applied: return, the step succeeded. Not applied: raise ``error`` (the session is
        unchanged, retry). Unreadable: raise ``OutcomeUnknown`` with the step count before.
        """
        assert self.store is not None
        try:
            found = await self.store.load(record.session_id, known_revision=record.revision)
        except ServiceError:
            raise OutcomeUnknown(record.session_id, before, "no reply in time") from None
        if found == record.revision:
            return  # the write was applied; only its reply was late
        if isinstance(found, SessionRecord) and found.revision == record.revision - 1:
            raise error  # not applied: the session is unchanged
        raise SessionConflict(
            record.session_id, record.revision - 1, None if found is None else _revision(found)
        )

    def _model_of(self, record: SessionRecord) -> ServedModel:
        try:
            return self.repository.get(record.model, record.version)
        except NotFound:
            served = [m.version for m in self.served_models() if m.name == record.model]
            raise SessionModelNotServed(
                record.session_id, record.model, record.version, served
            ) from None

    # -- validation -------------------------------------------------------------------------
    def parse_chunk(self, model: ServedModel, raw: Any, where: str, allow_flat: bool) -> FloatArray:
        """Turn decoded JSON (or a float32 array) into a chunk (T, n) of finite float32, or raise
        naming the problem (see ``service.engine.inputs``)."""
        n = model.metadata.input_size
        return inputs.parse_chunk(raw, where, n, self.max_steps_per_chunk, allow_flat)

    # -- observability ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        models = []
        for model in self.served_models():
            models.append(
                {
                    "model": model.name,
                    "version": model.version,
                    "provider": model.provider,
                    "queue_depth": model.batcher.queue_depth,
                    "sessions": model.pool.in_use,
                    "pool_capacity": model.pool.capacity,
                    "pool_bytes": model.pool.nbytes,
                    **model.batcher.stats.summary(),
                }
            )
        return {"sessions": len(self.sessions), "models": models}


def _revision(found: SessionRecord | int) -> int:
    return found if isinstance(found, int) else found.revision


def _check_not_held(session: Session) -> None:
    if session.holder is not None:
        raise SessionHeld(session.id)


def _check_step_count(session: Session, expected: int | None) -> None:
    if expected is not None and expected != session.step_count:
        raise StepCountMismatch(session.id, expected, session.step_count)


def _zero_state(model: ServedModel) -> FloatArray:
    meta = model.metadata
    return np.zeros((meta.num_states, meta.num_layers, meta.hidden_size), np.float32)  # (S, L, m)


def _slots(session: Session) -> SlotArray:
    return np.array([session.slot], dtype=np.intp)  # (1,)


async def _finish_even_if_cancelled(future: asyncio.Future[T]) -> T:
    """Await a step; if our caller is cancelled, still wait for it (chunk and store write).

    The session lock is held meanwhile, so no other step, reset or delete can touch the slot
    while the chunk is queued or running, and memory and store never disagree.
    """
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
