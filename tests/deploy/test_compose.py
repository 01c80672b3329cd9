"""The deployment files: what docker-compose v1 cannot check (the CPU override's ``!reset``
merge) and the wiring between files (ports, websocket headers, scrape targets, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RESET = object()  # Compose's `!reset`: drop the value of the files before


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)
    return data


def merge(base: Any, override: Any) -> Any:
    """Compose's merge for mappings (enough for these files): override wins, ``!reset`` drops."""
    if override is RESET:
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value)
        return {k: v for k, v in merged.items() if v is not None}
    return override


def test_default_stack_reserves_the_gpu_for_several_replicas() -> None:
    service = load("docker-compose.yml")["services"]["rnnserve"]
    assert service["image"].endswith("-gpu")
    assert service["build"]["args"] == {"VARIANT": "gpu"}
    assert service["deploy"]["replicas"] >= 2
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert service["environment"]["RNNSERVE_SESSION_STORE"] == "redis"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_cpu_variant_drops_the_gpu_and_keeps_the_rest() -> None:
    base = load("docker-compose.yml")
    merged = merge(base, load("docker-compose.cpu.yml"))["services"]["rnnserve"]
    assert merged["image"].endswith("-cpu")
    assert merged["build"] == {"context": ".", "target": "service", "args": {"VARIANT": "cpu"}}
    assert "resources" not in merged["deploy"]
    assert merged["deploy"]["replicas"] >= 2
    assert merged["environment"]["RNNSERVE_PROVIDERS"] == "CPUExecutionProvider"
    assert merged["environment"]["RNNSERVE_REDIS_URL"] == "redis://redis:6379/0"


def test_everything_starts_in_order_of_health() -> None:
    services = load("docker-compose.yml")["services"]
    assert "healthcheck" in services["redis"]
    for name in ("nginx", "prometheus"):
        assert services[name]["depends_on"]["rnnserve"]["condition"] == "service_healthy"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "/health/ready" in dockerfile.split("HEALTHCHECK", 1)[1].splitlines()[1]


def test_nginx_passes_websockets_and_prometheus_scrapes_each_replica() -> None:
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    stream = nginx.split("location /v1/stream", 1)[1].split("}", 1)[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in stream
    assert "proxy_set_header Connection $connection_upgrade;" in stream
    assert "proxy_http_version 1.1;" in stream
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["dns_sd_configs"][0]["names"] == ["rnnserve"]
    assert scrape["dns_sd_configs"][0]["port"] == 8000


def test_only_nginx_is_reachable_from_other_machines() -> None:
    services = load("docker-compose.yml")["services"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert published == {"nginx": ["8000:80"], "prometheus": ["127.0.0.1:9090:9090"]}
