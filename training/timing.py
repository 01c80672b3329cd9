"""Small helpers shared by the studies and the benchmarks: repeatable timings, the machine's name.

Standard library only, so that benchmarks without torch can use them too.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], min_time_s: float, max_repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call (first-run allocations, lazy set-up).

    Runs at least 3 times, then until ``min_time_s`` has passed or ``max_repeats`` runs are done.
    """
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_repeats and time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
