"""Cheap, bounded statistics of a batcher: counters and rings of recent latencies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class LatencyRing:
    """The last ``size`` samples (seconds), summarised as percentiles in milliseconds."""

    def __init__(self, size: int = 4096) -> None:
        self._samples = np.zeros(size, dtype=np.float64)
        self._count = 0

    def add(self, seconds: float) -> None:
        self._samples[self._count % self._samples.size] = seconds
        self._count += 1

    def add_many(self, seconds: list[float]) -> None:
        """Add samples in order, as ``add`` one by one would (the oldest ones drop out first)."""
        size = self._samples.size
        recent = seconds[-size:]  # with more samples than room, only the last ones stay
        start = (self._count + len(seconds) - len(recent)) % size
        first = min(len(recent), size - start)
        self._samples[start : start + first] = recent[:first]
        self._samples[: len(recent) - first] = recent[first:]
        self._count += len(seconds)

    def summary(self) -> dict[str, float | None]:
        recent = self._samples[: min(self._count, self._samples.size)]
        if recent.size == 0:
            return {"p50": None, "p90": None, "p99": None, "max": None}
        p50, p90, p99 = np.percentile(recent, [50, 90, 99]) * 1000.0
        return {"p50": p50, "p90": p90, "p99": p99, "max": float(recent.max()) * 1000.0}


class BatcherStats:
    """What one batcher has done since startup."""

    def __init__(self) -> None:
        self.batches = 0
        self.failed_batches = 0
        self.chunks = 0
        self.steps = 0  # session-steps run (a chunk of T steps counts T)
        self.max_batch_size = 0
        self.queue_delay = LatencyRing()
        self.step_latency = LatencyRing()
        self.batch_run = LatencyRing(1024)  # seconds inside each ONNX Runtime call
        self.batch_listeners: list[Callable[[int, bool], None]] = []  # e.g. a metrics histogram

    def record_batch(self, size: int, failed: bool, steps: int = 0) -> None:
        """Count a batch of ``size`` chunks holding ``steps`` session-steps in all."""
        for listener in self.batch_listeners:
            listener(size, failed)
        self.batches += 1
        self.failed_batches += int(failed)
        self.chunks += size
        if not failed:
            self.steps += steps
        self.max_batch_size = max(self.max_batch_size, size)

    def summary(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "chunks": self.chunks,
            "steps": self.steps,
            "batch_size_mean": self.chunks / self.batches if self.batches else None,
            "batch_size_max": self.max_batch_size,
            "queue_delay_ms": self.queue_delay.summary(),
            "step_latency_ms": self.step_latency.summary(),
            "batch_run_ms": self.batch_run.summary(),
        }
