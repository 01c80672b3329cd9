"""The timing helpers shared by the studies and the benchmarks."""

from __future__ import annotations

from training.timing import cpu_model, median_seconds


def test_median_seconds_warms_up_then_repeats_within_its_bounds() -> None:
    calls: list[int] = []
    seconds = median_seconds(lambda: calls.append(1), min_time_s=10.0, max_repeats=5)
    assert len(calls) == 1 + 5  # one warm-up, then max_repeats before min_time_s runs out
    assert 0 <= seconds < 0.1


def test_median_seconds_runs_at_least_three_times() -> None:
    calls: list[int] = []
    median_seconds(lambda: calls.append(1), min_time_s=0.0, max_repeats=1)
    assert len(calls) == 1 + 3


def test_cpu_model_names_something() -> None:
    assert cpu_model().strip()
