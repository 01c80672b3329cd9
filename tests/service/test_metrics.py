"""Prometheus metrics at /metrics: counts by kind, histograms, gauges, one registry per app."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.metrics import LATENCIES_S, LatencyHistogram

if TYPE_CHECKING:
    from fastapi.testclient import TestClient


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics by (name, labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def label(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_metrics_count_requests_errors_and_batches(client: TestClient) -> None:
    session_id = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    for inputs in ([[1, 2], [3, 4]], [[1, 2, 3]], [[5, 6]]):
        client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": inputs})
    client.post("/v1/models/tiny/predict", json={"inputs": [[[1, 2]]]})
    samples = scrape(client)
    assert samples[("rnnserve_requests_total", label(kind="create_session"))] == 1
    assert samples[("rnnserve_requests_total", label(kind="step"))] == 3
    assert samples[("rnnserve_requests_total", label(kind="predict"))] == 1
    assert samples[("rnnserve_errors_total", label(kind="step", status="422"))] == 1
    v2 = {"model": "tiny", "version": "2"}
    assert samples[("rnnserve_step_latency_seconds_count", label(**v2))] == 2
    assert samples[("rnnserve_batch_size_count", label(**v2))] == 3  # 2 steps and 1 predict
    assert samples[("rnnserve_batch_size_bucket", label(**v2, le="1.0"))] == 3
    assert samples[("rnnserve_sessions_active", label())] == 1
    assert samples[("rnnserve_pool_sessions", label(**v2))] == 1
    assert samples[("rnnserve_queue_depth", label(**v2))] == 0
    for version in ("1", "2"):
        key = label(model="tiny", version=version, provider="CPUExecutionProvider")
        assert samples[("rnnserve_model_provider", key)] == 1


def test_each_app_has_its_own_registry(make_client: Callable[..., TestClient]) -> None:
    first, second = make_client(), make_client()
    first.post("/v1/sessions", json={"model": "tiny"})
    assert scrape(first)[("rnnserve_requests_total", label(kind="create_session"))] == 1
    assert ("rnnserve_requests_total", label(kind="create_session")) not in scrape(second)


def test_idle_expiry_counts_as_an_eviction(make_client: Callable[..., TestClient]) -> None:
    client = make_client(idle_ttl_s=0.05)
    session_id = client.post("/v1/sessions", json={"model": "tiny"}).json()["session_id"]
    deadline = time.monotonic() + 10
    while client.get(f"/v1/sessions/{session_id}").status_code != 404:
        assert time.monotonic() < deadline, "the session did not expire"
        time.sleep(0.05)
    samples = scrape(client)
    assert samples[("rnnserve_session_evictions_total", label(reason="idle"))] == 1
    assert samples[("rnnserve_sessions_active", label())] == 0


def test_latency_histogram_is_exposed_like_a_prometheus_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LatencyHistogram("step_seconds", "Step time.", buckets=LATENCIES_S)
    ours.register(histogram)
    reference = Histogram(
        "step_seconds", "Step time.", ["model", "version"], buckets=LATENCIES_S, registry=theirs
    )
    # bucket bounds themselves, values between them, beyond the last one, and two series
    values = [0.0005, 0.0007, 0.001, 0.02, 0.03, 5.0, 7.5, 0.0]
    for model, version in (("a", 1), ("a", 2)):
        for value in values[: 4 + version * 2]:
            histogram.series(model, version).observe(value)
            reference.labels(model, str(version)).observe(value)

    def without_created(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created{" not in line]

    assert without_created(ours) == without_created(theirs)
    created = [line for line in generate_latest(ours).decode().splitlines() if "_created{" in line]
    assert len(created) == 2
