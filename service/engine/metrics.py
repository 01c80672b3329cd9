"""Prometheus metrics, in a registry of the app's own (no global state); served at ``/metrics``.

Counters and histograms are updated as requests pass; gauges (sessions, queue depth, provider,
store counters) are read from the data plane when Prometheus scrapes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate
from types import TracebackType
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.engine.errors import ServiceError
from service.engine.models import ServedModel
from service.engine.sessions import SessionManager
from service.engine.store import SessionStore

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LATENCIES_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class MetricsSource(Protocol):
    """What the gauges are read from at scrape time (the data plane)."""

    sessions: SessionManager
    store: SessionStore | None

    def served_models(self) -> list[ServedModel]: ...


class Metrics:
    """The service's metrics; ``track`` counts data-plane calls (REST, websocket and V2 alike)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rnnserve_requests",
            "Data-plane calls by kind (create_session, step, reset, delete, predict, ...).",
            ["kind"],
            registry=self.registry,
        )
        self.errors = Counter(
            "rnnserve_errors",
            "Failed data-plane calls by kind and HTTP status.",
            ["kind", "status"],
            registry=self.registry,
        )
        self.step_latency = LatencyHistogram(
            "rnnserve_step_latency_seconds",
            "Session step time in the data plane: queue, model run and store write.",
            buckets=LATENCIES_S,
        )
        self.registry.register(self.step_latency)
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "Chunks per ONNX Runtime call.",
            ["model", "version"],
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self._trackers: dict[str, CallTracker] = {}

    def track(self, kind: str) -> CallTracker:
        """Count one call of ``kind``, and its error status if it raises a ``ServiceError``.

        Use as ``with metrics.track("step"): ...``; the tracker of each kind is made once, since
        looking up a labelled child (``labels()``) costs more than the count itself.
        """
        tracker = self._trackers.get(kind)
        if tracker is None:
            tracker = self._trackers[kind] = CallTracker(self, kind)
        return tracker

    def observe_step(self, model: str, version: int, started: float) -> None:
        """Record a step that began at ``time.perf_counter()`` value ``started``."""
        self.step_latency.series(model, version).observe(time.perf_counter() - started)

    def observe_batches(self, model: ServedModel) -> None:
        """Feed the batch size histogram from a model's batcher."""
        sizes = self.batch_size.labels(model.name, str(model.version))
        model.batcher.stats.batch_listeners.append(lambda size, _failed: sizes.observe(size))

    def forget_model(self, name: str, version: int) -> None:
        """Drop the series of an unloaded model version (the gauges follow the served models)."""
        self.step_latency.remove(name, version)
        self.batch_size.remove(name, str(version))  # made by ``observe_batches`` at load

    def watch(self, dataplane: Callable[[], MetricsSource | None]) -> None:
        """Export the data plane's gauges at scrape time (``dataplane()`` may be None early)."""
        self.registry.register(_DataPlaneCollector(dataplane))

    def render(self) -> bytes:
        for tracker in self._trackers.values():
            tracker.flush()
        return generate_latest(self.registry)


class CallTracker:
    """A reusable context manager counting the calls of one kind and their errors by status.

    Calls are counted in a plain int and added to the Prometheus counter when metrics are
    rendered: ``Counter.inc`` takes a lock, which costs more than the count itself on every step.
    """

    def __init__(self, metrics: Metrics, kind: str) -> None:
        self._kind = kind
        self._calls = metrics.requests.labels(kind)
        self._errors = metrics.errors
        self._uncounted = 0  # calls not yet added to ``_calls``

    def flush(self) -> None:
        """Add the calls counted since the last flush to the Prometheus counter."""
        uncounted, self._uncounted = self._uncounted, 0
        if uncounted:
            self._calls.inc(uncounted)

    def __enter__(self) -> None:
        self._uncounted += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, ServiceError):
            self._errors.labels(self._kind, str(exc.status_code)).inc()


class LatencySeries:
    """The histogram of one model version: counts per bucket (not cumulative) and their sum."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds  # upper bounds, the last one infinite
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # a bucket holds values <= its bound
        self.total += seconds


class LatencyHistogram(Collector):
    """A Prometheus histogram labelled by model and version, counted in plain Python.

    Exposed exactly like a ``prometheus_client.Histogram`` (buckets, count, sum, created), but an
    observation is a bisect and two additions instead of two locked updates: it runs on every
    step. Observe and collect from the event loop's thread only.
    """

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [*buckets, float("inf")]
        # the "le" label as prometheus_client writes it ("0.0005", "1.0", "+Inf")
        self._les = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, int], LatencySeries] = {}

    def series(self, model: str, version: int) -> LatencySeries:
        found = self._series.get((model, version))
        if found is None:
            found = self._series[(model, version)] = LatencySeries(self._bounds)
        return found

    def remove(self, model: str, version: int) -> None:
        self._series.pop((model, version), None)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["model", "version"])
        for (model, version), series in self._series.items():
            labels = [model, str(version)]
            buckets = list(zip(self._les, accumulate(series.counts), strict=True))
            family.add_metric(labels, buckets, series.total)
            created = {"model": model, "version": str(version)}
            family.add_sample(f"{self._name}_created", created, series.created)
        return [family]


class _DataPlaneCollector(Collector):
    def __init__(self, dataplane: Callable[[], MetricsSource | None]) -> None:
        self._dataplane = dataplane

    def collect(self) -> Iterable[Metric]:
        dataplane = self._dataplane()
        if dataplane is None:
            return []
        return [
            *_session_metrics(dataplane),
            *_model_metrics(dataplane),
            *_store_metrics(dataplane),
        ]


def _session_metrics(dataplane: MetricsSource) -> list[Metric]:
    active = GaugeMetricFamily(
        "rnnserve_sessions_active", "Sessions held in this replica's memory."
    )
    active.add_metric([], len(dataplane.sessions))
    evictions = CounterMetricFamily(
        "rnnserve_session_evictions",
        "Sessions ended or dropped from memory, by reason (idle, capacity, store, deleted, "
        "unloaded).",
        labels=["reason"],
    )
    for reason, count in sorted(dataplane.sessions.evictions.items()):
        evictions.add_metric([reason], count)
    return [active, evictions]


def _model_metrics(dataplane: MetricsSource) -> list[Metric]:
    labels = ["model", "version"]
    depth = GaugeMetricFamily(
        "rnnserve_queue_depth", "Chunks waiting for a batch, per model version.", labels=labels
    )
    slots = GaugeMetricFamily(
        "rnnserve_pool_sessions", "State pool slots in use, per model version.", labels=labels
    )
    provider = GaugeMetricFamily(
        "rnnserve_model_provider",
        "The execution provider in use per model version (value 1).",
        labels=[*labels, "provider"],
    )
    for model in dataplane.served_models():
        key = [model.name, str(model.version)]
        depth.add_metric(key, model.batcher.queue_depth)
        slots.add_metric(key, model.pool.in_use)
        provider.add_metric([*key, model.provider], 1)
    return [depth, slots, provider]


def _store_metrics(dataplane: MetricsSource) -> list[Metric]:
    if dataplane.store is None:
        return []
    stats = dataplane.store.stats
    described = {
        "pipelines": "Round trips to the session store (one pipeline per event-loop tick).",
        "commands": "Commands sent to the session store.",
        "conflicts": "Writes refused because another replica advanced the session first.",
        "unavailable": "Round trips that failed because the store was unreachable.",
    }
    families: list[Metric] = []
    for name, text in described.items():
        family = CounterMetricFamily(f"rnnserve_store_{name}", text)
        family.add_metric([], getattr(stats, name))
        families.append(family)
    return families
