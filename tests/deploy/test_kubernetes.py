"""deploy/k8s: every manifest valid against the Kubernetes schemas (offline, the
``kubernetes-validate`` package), KServe's against a schema of the fields used, and the values
that must agree across files: ports, probes, selectors, environment, shutdown timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"  # the oldest version the manifests are checked against; newer keep these
KSERVE_SCHEMA = json.loads((Path(__file__).parent / "kserve.schema.json").read_text())
KSERVE_KINDS = {"ServingRuntime", "InferenceService"}
PRESTOP_S = 5


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file, document) for every Kubernetes object under deploy/k8s."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] != "Kustomization":
                found.append((str(path.relative_to(K8S)), doc))
    return found


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [
        d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    return doc


def container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"]
    (first,) = [c for c in spec["containers"] if c["name"] in ("rnnserve", "kserve-container")]
    return first


def env(doc: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(doc)["env"]}


def as_pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


@pytest.mark.parametrize(
    ("name", "doc"), [pytest.param(n, d, id=f"{n}:{d['kind']}") for n, d in manifests()]
)
def test_manifest_is_valid(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] not in KSERVE_KINDS:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    jsonschema.validate(doc, KSERVE_SCHEMA)
    spec = doc["spec"]
    if doc["kind"] == "ServingRuntime":  # its containers and volumes are core Pod fields
        pod = {"containers": spec["containers"], "volumes": spec.get("volumes", [])}
    else:
        model = spec["predictor"]["model"]
        parts = {k: model[k] for k in ("env", "resources") if k in model}
        pod = {"containers": [{"name": "model", "image": "x", **parts}]}
        pod["tolerations"] = spec["predictor"].get("tolerations", [])
    kubernetes_validate.validate(as_pod(pod), KUBERNETES, strict=True)


def test_kustomization_lists_every_core_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_every_rnnserve_variable_is_a_setting() -> None:
    for doc in (one("Deployment"), one("ServingRuntime")):
        names = {n.removeprefix("RNNSERVE_").lower() for n in env(doc) if n.startswith("RNNSERVE_")}
        assert names <= set(Settings.model_fields), names - set(Settings.model_fields)


def test_service_reaches_http_and_grpc_on_the_pods() -> None:
    deployment, service = one("Deployment"), one("Service", "rnnserve")
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert env(deployment)["RNNSERVE_PORT"] == "8000"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"),
        "grpc": (8001, "grpc"),
    }
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_probes_use_the_health_endpoints() -> None:
    main = container(one("Deployment"))
    assert main["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    kserve = container(one("ServingRuntime"))
    assert kserve["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert kserve["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert env(one("ServingRuntime"))["RNNSERVE_PORT"] == "8080"


def test_sigterm_has_time_to_drain() -> None:
    deployment = one("Deployment")
    main = container(deployment)
    assert main["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    drain = int(env(deployment)["RNNSERVE_SHUTDOWN_TIMEOUT_S"])
    assert (
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > PRESTOP_S + drain
    )
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("kind", ["Deployment", "ServingRuntime"])
def test_runs_non_root_on_a_read_only_root_with_a_writable_tmp(kind: str) -> None:
    doc = one(kind)
    spec = doc["spec"]["template"]["spec"] if kind == "Deployment" else doc["spec"]
    main = container(doc)
    context = {**spec.get("securityContext", {}), **main["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001  # the image's user
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env(doc)["CUDA_CACHE_PATH"].startswith("/tmp/")


def test_pods_get_a_gpu_and_the_gpu_image() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu_image = compose["x-rnnserve"]["image"]
    assert container(one("Deployment"))["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(one("Deployment"))["image"] == gpu_image
    assert container(one("ServingRuntime"))["image"] == gpu_image
    model = one("InferenceService")["spec"]["predictor"]["model"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_sessions_are_stored_in_the_redis_of_the_manifests() -> None:
    redis = one("Service", "rnnserve-redis")
    (port,) = redis["spec"]["ports"]
    url = f"redis://{redis['metadata']['name']}:{port['port']}/0"
    for doc in (one("Deployment"), one("ServingRuntime")):
        assert env(doc)["RNNSERVE_SESSION_STORE"] == "redis"
        assert env(doc)["RNNSERVE_REDIS_URL"] == url
    store = one("StatefulSet")
    assert (
        store["spec"]["template"]["metadata"]["labels"].items() >= redis["spec"]["selector"].items()
    )
    assert "--appendonly" in container_named(store, "redis")["args"]


def container_named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def test_autoscaler_scales_the_deployment() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "rnnserve",
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_inference_service_uses_the_runtime_with_the_v2_protocol() -> None:
    runtime, service = one("ServingRuntime"), one("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["v2"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_kserve_schema_rejects_unknown_fields() -> None:
    runtime = one("ServingRuntime")
    broken = {**runtime, "spec": {**runtime["spec"], "protocolVersion": ["v2"]}}  # a typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KSERVE_SCHEMA)


def test_kubernetes_validation_rejects_unknown_fields() -> None:
    deployment = one("Deployment")
    template = deployment["spec"]["template"]
    typo = {**container(deployment), "livenesProbe": {}}
    broken = {
        **deployment,
        "spec": {
            **deployment["spec"],
            "template": {**template, "spec": {**template["spec"], "containers": [typo]}},
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
