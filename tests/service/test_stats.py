"""The batcher's latency rings: adding a batch of samples equals adding them one by one."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.stats import LatencyRing


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([3, 2], id="fits"),
        pytest.param([5, 4, 6], id="wraps"),
        pytest.param([2, 19], id="more-than-the-ring"),
        pytest.param([0, 7, 0, 1], id="empty-batches"),
    ],
)
def test_add_many_keeps_the_same_samples_as_add(sizes: list[int]) -> None:
    rng = np.random.default_rng(sum(sizes))
    one_by_one, batched = LatencyRing(size=7), LatencyRing(size=7)
    for size in sizes:
        samples = rng.random(size).tolist()
        for sample in samples:
            one_by_one.add(sample)
        batched.add_many(samples)
    assert batched.summary() == one_by_one.summary()
    assert batched.summary()["max"] is not None


def test_summary_is_in_milliseconds() -> None:
    ring = LatencyRing(size=4)
    ring.add_many([0.001, 0.002, 0.003, 0.004, 0.010])  # the first one drops out
    assert ring.summary()["max"] == pytest.approx(10.0)
    assert ring.summary()["p50"] == pytest.approx(3.5)
