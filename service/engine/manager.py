"""The model lifecycle: load, reload and unload model versions while the service runs.

``ModelManager`` decides which versions serve. Whatever the control mode, it loads every valid
version at startup. ``load(name)`` reads one model's folder again and brings the served versions in
line with it: new versions load, versions whose files changed (another sha256) reload, removed
versions unload, and broken ones are refused with the registry's reason while the versions already
serving go on. ``unload(name)`` unloads every version of a model. In poll mode the whole folder is
read again every ``repository_poll_s`` seconds (a version folder whose files did not change is not
validated again). The protocol front ends (HTTP and gRPC) call ``index``, ``load`` and ``unload``.

Files are validated and ONNX Runtime sessions created in the executor, never on the event loop.
A change publishes a new ``ModelRepository`` in one assignment (copy-on-write: a request that
already resolved its model version keeps it). A version taken out of service retires: new requests
stop finding it and its sessions at once, the steps already queued or waiting finish with their
normal answers, then its sessions end (a later request gets a 404 naming the version and the
versions still served) and its batcher stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from service.engine.batcher import Batcher
from service.engine.dataplane import DataPlane
from service.engine.device_pool import DevicePool, StateLayout, buckets_up_to
from service.engine.errors import (
    InvalidModelName,
    ModelControlDisabled,
    ModelLoadRefused,
    ModelNotInRepository,
)
from service.engine.metadata import MODEL_NAME_PATTERN
from service.engine.models import ModelRepository, ServedModel
from service.engine.registry import (
    ModelLoadError,
    ModelSpec,
    SkippedModel,
    model_dirs,
    read_model_dir,
    version_dirs,
)
from service.engine.runtime import ModelRuntime, cuda_options
from service.engine.sessions import Session, UnloadedVersion
from service.engine.state_pool import SlotPool, StatePool
from service.settings import Settings

logger = logging.getLogger(__name__)

Key = tuple[str, int]  # (model name, version)
Fingerprint = tuple[tuple[int, int, int] | None, ...]  # per file: size, mtime (ns), inode
FILES = ("metadata.json", "model.onnx")
DRAIN_POLL_S = 0.01  # how often a retiring version checks that its batcher ran dry


class VersionState(Enum):
    """A model version's state in the repository index, named as Triton names them."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index; ``reason`` says why it is in its state."""

    name: str
    version: int
    state: VersionState
    reason: str = ""


@dataclass(frozen=True)
class FolderRead:
    """What the last read of a version folder found: a valid spec, or why it cannot serve."""

    fingerprint: Fingerprint
    spec: ModelSpec | None
    reason: str = ""


@dataclass
class Change:
    """Versions to start serving and versions to take out, decided before either happens."""

    add: list[ServedModel] = field(default_factory=list)
    remove: list[ServedModel] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)  # "version N: reason"


class ModelManager:
    """Loads, reloads and unloads model versions; one change at a time."""

    def __init__(self, settings: Settings, dataplane: DataPlane, executor: Executor) -> None:
        self.settings = settings
        self.dataplane = dataplane
        self._executor = executor
        self._lock = asyncio.Lock()  # load, unload and poll run one at a time
        self._folders: dict[str, dict[int, FolderRead]] = {}  # per model, its version folders
        self._loading: set[Key] = set()  # loading, or loaded and not yet published
        self._retiring: set[ServedModel] = set()
        self._running: set[ServedModel] = set()  # batcher started and not stopped
        self._reported: set[Path] = set()  # odd folders already logged
        self._folder_error = ""  # why the models folder could not be read last time
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Load every valid version in the background, then poll in poll mode."""
        self._task = asyncio.create_task(self._run(), name="models")

    async def stop_control(self) -> None:
        """Stop loading and polling (at shutdown); the served versions serve until ``stop``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every batcher (at shutdown, once the data plane has drained)."""
        for model in list(self._running):
            await self._stop_batcher(model, "service is shutting down")

    async def _run(self) -> None:
        await self._sync_logged(force=True)
        if not self.dataplane.ready:
            logger.error(
                "no model loaded from %s; the service stays unready", self.settings.models_dir
            )
        while self.settings.model_control_mode == "poll":
            await asyncio.sleep(self.settings.repository_poll_s)
            await self._sync_logged(force=False)

    async def _sync_logged(self, force: bool) -> None:
        try:
            async with self._lock:
                await self._sync_all(force)
            self._folder_error = ""
        except OSError as exc:  # e.g. the models folder is gone: keep serving what serves
            if str(exc) != self._folder_error:  # once, not at every poll
                logger.error("cannot read the models folder: %s; serving what serves", exc)
            self._folder_error = str(exc)
        except Exception:  # a bug: log it, keep serving and polling
            logger.exception("reading the models folder %s failed", self.settings.models_dir)

    # -- the repository API -----------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version in the models folder or in service, with its state and reason."""
        served = {(m.name, m.version): m for m in self.dataplane.served_models()}
        retiring = {(m.name, m.version) for m in self._retiring}
        found = {(name, version) for name, reads in self._folders.items() for version in reads}
        keys = sorted(served.keys() | retiring | found | self._loading)
        entries = [self._entry(key, served.get(key), key in retiring) for key in keys]
        return [e for e in entries if e.state is VersionState.READY] if ready_only else entries

    async def load(self, name: str) -> None:
        """Load or reload ``name`` from its folder (explicit mode only).

        New versions load, changed ones reload, removed ones unload. Raises ``ModelLoadRefused``
        naming each version that cannot serve and why (the others serve), and
        ``ModelNotInRepository`` if the model has no folder.
        """
        self._check_control(name)
        async with self._lock:
            change = await self._plan(name, force=True)
            await self._apply(change)
        if name not in self._folders:
            raise ModelNotInRepository("load", name, self._folders)
        if not self._folders[name]:
            change.refusals.append("its folder holds no version folder")
        if change.refusals:
            raise ModelLoadRefused(name, change.refusals, self._served_versions(name))

    async def unload(self, name: str) -> None:
        """Unload every version of ``name`` (explicit mode only); returns once they are gone.

        Unloading a model that is in the models folder but not loaded does nothing, as in Triton.
        """
        self._check_control(name)
        async with self._lock:
            models = [m for m in self.dataplane.served_models() if m.name == name]
            if not models and not (self.settings.models_dir / name).is_dir():
                raise ModelNotInRepository("unload", name, self._folders)
            await self._apply(Change(remove=models))

    def _check_control(self, name: str) -> None:
        if self.settings.model_control_mode != "explicit":
            raise ModelControlDisabled(self.settings.model_control_mode)
        if not re.match(MODEL_NAME_PATTERN, name):
            raise InvalidModelName(name)

    def _entry(self, key: Key, model: ServedModel | None, retiring: bool) -> IndexEntry:
        read = self._folders.get(key[0], {}).get(key[1])
        problem = read.reason if read is not None else ""
        if model is not None:
            refused = f"serving the files loaded before; new files refused: {problem}"
            return IndexEntry(*key, VersionState.READY, refused if problem else "")
        if key in self._loading:
            return IndexEntry(*key, VersionState.LOADING)
        if retiring:
            return IndexEntry(*key, VersionState.UNLOADING, "finishing the steps in flight")
        return IndexEntry(*key, VersionState.UNAVAILABLE, problem or "unloaded")

    def _served_versions(self, name: str) -> list[int]:
        return [m.version for m in self.dataplane.served_models() if m.name == name]

    # -- following the folder ---------------------------------------------------------------
    async def _sync_all(self, force: bool) -> None:
        """Bring every model in line with the folder; one publish for all of them."""
        loop = asyncio.get_running_loop()
        skipped: list[SkippedModel] = []
        folder = self.settings.models_dir
        names = await loop.run_in_executor(self._executor, model_dirs, folder, skipped)
        self._report(skipped)
        served = (m.name for m in self.dataplane.served_models())
        total = Change()
        for name in sorted({*(p.name for p in names), *self._folders, *served}):
            try:
                change = await self._plan(name, force)
            except OSError as exc:  # the folder changed while it was read: next time
                logger.error("cannot read model %s: %s", folder / name, exc)
                continue
            total.add += change.add
            total.remove += change.remove
        await self._apply(total)

    async def _plan(self, name: str, force: bool) -> Change:
        """Read the folder of ``name`` and load what should start serving (not yet published)."""
        loop = asyncio.get_running_loop()
        previous = self._folders.get(name, {})
        reads, skipped = await loop.run_in_executor(
            self._executor, self._read_model, name, previous, force
        )
        self._report(skipped)
        if reads is None:
            self._folders.pop(name, None)
            reads = {}
        else:
            self._folders[name] = reads
        served = {m.version: m for m in self.dataplane.served_models() if m.name == name}
        change = Change(remove=[m for v, m in served.items() if v not in reads])
        for version, read in sorted(reads.items()):
            if read.spec is None or not _differs(served.get(version), read.spec):
                continue
            loaded = await self._load_version(read.spec)
            if isinstance(loaded, str):
                reads[version] = replace(read, spec=None, reason=loaded)
                continue
            change.add.append(loaded)
            if version in served:
                change.remove.append(served[version])
        change.refusals = [f"version {v}: {r.reason}" for v, r in sorted(reads.items()) if r.reason]
        return change

    def _read_model(
        self, name: str, previous: dict[int, FolderRead], force: bool
    ) -> tuple[dict[int, FolderRead] | None, list[SkippedModel]]:
        """Validate the version folders of ``name`` (in the executor); None if it has no folder.

        Without ``force``, a version folder whose files kept their fingerprint is not read again.
        """
        name_dir = self.settings.models_dir / name
        skipped: list[SkippedModel] = []
        if not name_dir.is_dir():
            return None, skipped
        reads = {}
        for version_dir in version_dirs(name_dir, skipped):
            version, fingerprint = int(version_dir.name), _fingerprint(version_dir)
            old = previous.get(version)
            if not force and old is not None and old.fingerprint == fingerprint:
                reads[version] = old
            else:
                reads[version] = _read_version(version_dir, fingerprint, old)
        return reads, skipped

    def _report(self, skipped: list[SkippedModel]) -> None:
        for skip in skipped:
            if skip.path not in self._reported:
                self._reported.add(skip.path)
                logger.error("skipping model %s: %s", skip.path, skip.reason)

    # -- loading and retiring versions ------------------------------------------------------
    async def _load_version(self, spec: ModelSpec) -> ServedModel | str:
        """Start serving ``spec`` (published by ``_apply``), or say why ONNX Runtime cannot."""
        key = (spec.metadata.name, spec.metadata.version)
        loop = asyncio.get_running_loop()
        self._loading.add(key)
        try:
            runtime = await loop.run_in_executor(self._executor, _runtime, spec, self.settings)
            await loop.run_in_executor(self._executor, runtime.probe)
            pool = await loop.run_in_executor(self._executor, _pool, runtime, self.settings)
        except ModelLoadError as exc:
            self._loading.discard(key)
            logger.error("refusing model %s: %s", spec.onnx_path, exc)
            return str(exc)
        except Exception as exc:  # ONNX Runtime raises several types for a graph it cannot load
            self._loading.discard(key)
            logger.error("skipping model %s: ONNX Runtime cannot load it: %s", spec.onnx_path, exc)
            return f"ONNX Runtime cannot load {spec.onnx_path.name}: {exc}"
        model = _serve(runtime, pool, self.settings, self._executor)
        self.dataplane.metrics.observe_batches(model)
        model.batcher.start()
        self._running.add(model)
        logger.info("serving %s/%s on %s", model.name, model.version, model.provider)
        return model

    async def _apply(self, change: Change) -> None:
        """Publish the served versions with ``change`` made, then retire the removed ones."""
        if not change.add and not change.remove:
            return
        kept = [m for m in self.dataplane.served_models() if m not in change.remove]
        self.dataplane.set_repository(ModelRepository([*kept, *change.add]))
        added = {(m.name, m.version) for m in change.add}
        self._loading -= added
        await asyncio.gather(
            *(self._retire(m, reloaded=(m.name, m.version) in added) for m in change.remove)
        )

    async def _retire(self, model: ServedModel, reloaded: bool) -> None:
        """Take ``model`` (already out of the repository) out of service once its steps ran."""
        served = tuple(self._served_versions(model.name))
        why = UnloadedVersion(model.name, model.version, served, reloaded)
        self._retiring.add(model)
        try:
            sessions = self.dataplane.sessions.detach_model(model, why)
            await self._finish_steps(model, sessions, why)
            for session in sessions:
                self.dataplane.sessions.end_detached(session)
            unloaded = f"model {model.name!r} version {model.version} was unloaded"
            await self._stop_batcher(model, unloaded)
        finally:
            self._retiring.discard(model)
        if model.version not in self._served_versions(model.name):
            self.dataplane.metrics.forget_model(model.name, model.version)
        logger.info("unloaded %s/%s; %d sessions ended", model.name, model.version, len(sessions))

    async def _finish_steps(
        self, model: ServedModel, sessions: list[Session], why: UnloadedVersion
    ) -> None:
        """Let the steps queued or waiting on ``sessions`` and on the batcher of ``model`` finish
        (for at most ``shutdown_timeout_s``), ending each session after its last step."""
        for session in sessions:
            if session.holder is not None:  # a mux stream lets go after its frame in flight
                session.holder.surrender(session, why.error(session.id).message)
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                for session in sessions:
                    async with session.lock:  # after every step already waiting for it
                        self.dataplane.sessions.end_detached(session)
                while model.batcher.busy:
                    await asyncio.sleep(DRAIN_POLL_S)
        except TimeoutError:
            logger.warning(
                "model %s/%s: steps still running after %s s fail with 503",
                model.name,
                model.version,
                self.settings.shutdown_timeout_s,
            )

    async def _stop_batcher(self, model: ServedModel, reason: str) -> None:
        self._running.discard(model)
        await model.batcher.stop(reason)


def _differs(served: ServedModel | None, spec: ModelSpec) -> bool:
    """Whether ``spec`` should (re)load: nothing serves its version, or other files do."""
    return served is None or served.metadata.sha256 != spec.metadata.sha256


def _fingerprint(version_dir: Path) -> Fingerprint:
    """Size, modification time and inode of each file: writing or replacing one changes it."""
    stats: list[tuple[int, int, int] | None] = []
    for name in FILES:
        try:
            stat = (version_dir / name).stat()
        except OSError:
            stats.append(None)
            continue
        stats.append((stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(stats)


def _read_version(
    version_dir: Path, fingerprint: Fingerprint, old: FolderRead | None
) -> FolderRead:
    try:
        return FolderRead(fingerprint, read_model_dir(version_dir))
    except ModelLoadError as exc:
        if old is None or old.reason != str(exc):  # log each new problem once
            logger.error("skipping model %s: %s", version_dir, exc)
        return FolderRead(fingerprint, None, str(exc))


def _runtime(spec: ModelSpec, settings: Settings) -> ModelRuntime:
    return ModelRuntime(
        spec, settings.providers, settings.intra_op_threads, cuda_tf32=settings.cuda_tf32
    )


def _pool(runtime: ModelRuntime, settings: Settings) -> SlotPool:
    """The state pool ``settings.state_pool`` asks for: on CUDA, ``auto`` keeps states there."""
    meta = runtime.metadata
    on_cuda = runtime.provider == "CUDAExecutionProvider"
    if settings.state_pool == "host" or (settings.state_pool == "auto" and not on_cuda):
        return StatePool(meta.num_states, meta.num_layers, meta.hidden_size, settings.max_sessions)
    layout = StateLayout(
        tuple(meta.state_inputs), tuple(meta.state_outputs), meta.num_layers, meta.hidden_size
    )
    return DevicePool(
        runtime.onnx_path,
        layout,
        max_slots=settings.max_sessions,
        device="cuda" if on_cuda else "cpu",
        intra_op_threads=settings.intra_op_threads,
        provider_options=cuda_options(settings.cuda_tf32) if on_cuda else None,
        buckets=buckets_up_to(settings.max_batch_size) if on_cuda and settings.cuda_graphs else (),
    )


def _serve(
    runtime: ModelRuntime, pool: SlotPool, settings: Settings, executor: Executor
) -> ServedModel:
    batcher = Batcher(
        runtime,
        pool,
        executor,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_s,
        max_queue_depth=settings.max_queue_depth,
        workers=os.cpu_count() or 1,  # a mux frame larger than a call runs on every core
        inline_below_s=settings.inline_call_us / 1e6,
    )
    return ServedModel(metadata=runtime.metadata, batcher=batcher)
