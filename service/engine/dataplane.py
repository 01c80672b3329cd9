"""The protocol-agnostic data plane: everything the REST, websocket and V2 layers call.

Protocol layers translate requests into these calls and results back; they hold no logic. Inputs
arrive as decoded JSON values (nested lists) or numpy arrays; results are numpy arrays.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from service.engine.batcher import ChunkResult
from service.engine.errors import (
    BadRequest,
    ChunkTooLarge,
    InvalidInput,
    NotFound,
    NotReady,
    ServiceError,
    SessionTakenOver,
)
from service.engine.metrics import Metrics
from service.engine.models import ModelRepository, ServedModel
from service.engine.runtime import FloatArray
from service.engine.sessions import LIVE, Session, SessionManager, SessionState
from service.engine.state_pool import SlotArray
from service.engine.store import SessionModelNotServed, SessionRecord, SessionStore
from service.engine.store.base import owner_hash
from service.engine.store.errors import SessionBusy, StoredSessionNotFound, StoredSessionUnreadable

T = TypeVar("T")
NUMBER_TYPES = frozenset({int, float})  # bool is not a number here, nor a numeric string
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT64_MAX = float(np.finfo(np.float64).max)
SMALL_MATRIX = 64  # values checked in Python below this size; numpy is faster above it
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
            step_count=session.step_count,
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
        self._repository: ModelRepository | None = None

    # -- models -----------------------------------------------------------------------------
    def set_repository(self, repository: ModelRepository) -> None:
        self._repository = repository

    def served_models(self) -> list[ServedModel]:
        return list(self._repository or [])

    @property
    def ready(self) -> bool:
        return self._repository is not None and any(True for _ in self._repository)

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
            _finite_matrix(raw[name], f"{where}.{name}", meta.num_layers, meta.hidden_size)
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
                    await self._save(session, _zero_state(session.model))
                except ServiceError:
                    self.sessions.evict(session, "store")
                    raise
            return self._info(session)

    async def session_info(self, session_id: str, owner: str | None) -> SessionInfo:
        with self.metrics.track("session_info"):
            session = await self._session(session_id, owner)
            async with session.lock:
                await self._refresh(session)
                return self._info(session)

    async def step(
        self, session_id: str, inputs: Any, owner: str | None, attachment: int | None = None
    ) -> StepOutput:
        """Run one chunk (T, n) on a session; steps of one session run one at a time, in order.

        With ``attachment`` (a websocket), the step fails with 409 if another connection took over.
        A rejected or failed step leaves the state and ``step_count`` exactly as they were. With a
        durable store the new state is stored before this returns; if another replica advanced
        the session meanwhile the step fails with 409 and the stored state stands.
        """
        with self.metrics.track("step"):
            for _ in range(EVICTED_RETRIES):
                if self.store is None:  # no await: the session is in memory or nowhere
                    session = self.sessions.get(session_id, owner)
                else:
                    session = await self._session(session_id, owner)
                x = self.parse_chunk(session.model, inputs, "inputs", allow_flat=True)
                async with session.lock:
                    if session.state is SessionState.EVICTED:
                        continue  # dropped from memory while we waited: load it again
                    self._check_live(session, attachment)
                    if self.store is None:  # the common case: one future, no extra task
                        started = time.perf_counter()
                        result = await self._submit(session, x)  # not cancellable: StepFuture
                        return self._stepped(session, result, started)
                    task = asyncio.ensure_future(self._advance(session, x))
                    return await _finish_even_if_cancelled(task)
            raise SessionBusy(session_id)

    async def _advance(self, session: Session, x: FloatArray) -> StepOutput:
        """Run the chunk from the current state and store the result (the session lock is held)."""
        assert self.store is not None
        started = time.perf_counter()
        await self._refresh(session)
        result = await self._submit(session, x)
        try:
            await self._save(session, result.state)
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
            session = await self._session(session_id, owner)
            async with session.lock:
                session.require(*LIVE)
                await self._refresh(session)
                if self.store is not None:
                    await self._save(session, _zero_state(session.model), step_count=0)
                session.model.pool.reset(session.slot)
                session.step_count = 0
                self.sessions.mark_used(session)
                return self._info(session)

    async def delete(self, session_id: str, owner: str | None) -> None:
        with self.metrics.track("delete"):
            session = await self._session(session_id, owner)
            async with session.lock:
                session.require(*LIVE)
                if self.store is not None:
                    await self.store.delete(session.id)
                self.sessions.close(session)

    async def attach(self, session_id: str, owner: str | None) -> tuple[SessionInfo, int]:
        """Attach a streaming connection; returns the attachment id to pass to ``step``."""
        with self.metrics.track("attach"):
            session = await self._session(session_id, owner)
            async with session.lock:
                await self._refresh(session)
                attachment = self.sessions.attach(session)
                return self._info(session), attachment

    def detach(self, session_id: str, attachment: int) -> None:
        """Mark the session idle again (it lives on for resume until its TTL)."""
        session = self.sessions.get_any(session_id)
        if session is not None:
            self.sessions.detach(session, attachment)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until no step is queued or running (for shutdown)."""
        deadline = time.monotonic() + timeout_s
        while any(m.batcher.queue_depth for m in self.served_models()) or self._steps_in_flight():
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)

    def _steps_in_flight(self) -> bool:
        return any(s.lock.locked() for s in self.sessions.cached())

    def _check_live(self, session: Session, attachment: int | None) -> None:
        if session.state is SessionState.STREAMING and attachment not in (None, session.attachment):
            raise SessionTakenOver(session.id)
        session.require(*LIVE)

    @staticmethod
    def _info(session: Session) -> SessionInfo:
        return SessionInfo.of(session, time.monotonic())

    # -- the durable store ------------------------------------------------------------------
    async def _session(self, session_id: str, owner: str | None) -> Session:
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

    async def _refresh(self, session: Session) -> None:
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

    async def _save(
        self, session: Session, state: FloatArray, step_count: int | None = None
    ) -> None:
        """Compare-and-set the session's next revision in the store."""
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
        await self.store.save(record)
        session.revision = record.revision

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
        """Turn decoded JSON into a chunk (T, n) of finite float32, or raise naming the problem.

        A flat list of numbers is one step when ``allow_flat``. A float32 array (from a binary
        protocol) is checked for its shape, length and values without a detour through lists.
        """
        n = model.metadata.input_size
        if isinstance(raw, np.ndarray):
            return self._checked_array(raw, where, n)
        if not isinstance(raw, list):
            raise InvalidInput(f"'{where}' must be a list of steps, each a list of {n} numbers")
        if not raw:
            raise InvalidInput(f"'{where}' is empty: send at least one step")
        if allow_flat and type(raw[0]) is not list and not any(isinstance(v, list) for v in raw):
            raw = [raw]
        if len(raw) > self.max_steps_per_chunk:
            raise ChunkTooLarge(f"'{where}'", len(raw), self.max_steps_per_chunk)
        return _finite_matrix(raw, where, len(raw), n, row_name="step")

    def _checked_array(self, raw: npt.NDArray[Any], where: str, n: int) -> FloatArray:
        if raw.dtype != np.float32 or raw.ndim != 2 or raw.shape[1] != n or not len(raw):
            raise InvalidInput(
                f"'{where}' must be float32 of shape (steps >= 1, {n}), "
                f"got {raw.dtype} {tuple(raw.shape)}"
            )
        if len(raw) > self.max_steps_per_chunk:
            raise ChunkTooLarge(f"'{where}'", len(raw), self.max_steps_per_chunk)
        bad = np.argwhere(~np.isfinite(raw))
        if bad.size:
            t, j = bad[0]
            raise BadRequest(_not_finite(where, t, j, repr(float(raw[t, j]))))
        return raw

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


def _finite_matrix(raw: Any, where: str, rows: int, cols: int, row_name: str = "row") -> FloatArray:
    """Check ``raw`` is ``rows`` lists of ``cols`` finite numbers; return it as float32."""
    matrix = _plain_float32_matrix(raw, rows, cols)
    if matrix is not None:
        return matrix
    return _checked_matrix(raw, where, rows, cols, row_name)


def _plain_float32_matrix(raw: Any, rows: int, cols: int) -> FloatArray | None:
    """The fast path: ``raw`` as float32 when it is plainly valid, else None.

    Plainly valid: ``rows`` lists of ``cols`` ints or floats, all within float32's range. Anything
    else (including values that only round into that range) takes ``_checked_matrix``, which
    finds and names the problem.
    """
    if type(raw) is not list or len(raw) != rows:
        return None
    for row in raw:
        if type(row) is not list or len(row) != cols or not NUMBER_TYPES.issuperset(map(type, row)):
            return None
    if rows * cols <= SMALL_MATRIX:
        return _small_float32_matrix(raw)
    try:
        matrix = np.array(raw, dtype=np.float64)  # (rows, cols)
    except OverflowError:  # an int beyond float64
        return None
    if not (np.abs(matrix) <= FLOAT32_MAX).all():
        return None
    return matrix.astype(np.float32)


def _small_float32_matrix(raw: list[list[int | float]]) -> FloatArray | None:
    """A few plain numbers as float32, or None if any may be beyond float32's range.

    The sum of absolute values is NaN, infinite or above the limit whenever one value is (a
    chunk of large but valid values may also fail the test: the slow path then accepts it).
    Each value is within float32's range, so converting it directly rounds as float64 then
    float32 does.
    """
    try:
        total = math.fsum(map(abs, chain.from_iterable(raw)))
    except OverflowError:  # an int beyond float64, or a sum beyond it
        return None
    if not total <= FLOAT32_MAX:
        return None
    return np.array(raw, dtype=np.float32)  # (rows, cols)


def _checked_matrix(raw: Any, where: str, rows: int, cols: int, row_name: str) -> FloatArray:
    """The slow path of ``_finite_matrix``: check value by value and name the first problem."""
    if not isinstance(raw, list) or len(raw) != rows:
        raise InvalidInput(f"'{where}' must be a list of {rows} {row_name}s")
    for t, row in enumerate(raw):
        if not isinstance(row, list):
            raise InvalidInput(f"'{where}[{t}]' must be a list of {cols} numbers, got {row!r:.40}")
        if len(row) != cols:
            raise InvalidInput(
                f"'{where}[{t}]' has {len(row)} values; the model expects {cols} per {row_name}"
            )
        for j, value in enumerate(row):
            if type(value) not in (int, float):
                raise BadRequest(f"'{where}[{t}][{j}]' is not a number: {value!r:.40}")
    try:
        matrix = np.asarray(raw, dtype=np.float64)
    except OverflowError:  # an int beyond float64 (JSON allows any number of digits)
        t, j = next(
            (t, j) for t, row in enumerate(raw) for j, v in enumerate(row) if abs(v) > FLOAT64_MAX
        )
        raise BadRequest(_not_finite(where, t, j, "an integer beyond float64")) from None
    with np.errstate(over="ignore"):
        as_float32 = matrix.astype(np.float32)
    bad = np.argwhere(~np.isfinite(as_float32))
    if bad.size:
        t, j = bad[0]
        raise BadRequest(_not_finite(where, t, j, repr(float(matrix[t, j]))))
    return as_float32


def _not_finite(where: str, t: int, j: int, value: str) -> str:
    return (
        f"'{where}[{t}][{j}]' is {value}: NaN, infinity and values beyond float32 are not accepted"
    )
