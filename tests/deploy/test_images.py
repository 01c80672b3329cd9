"""The image files: two service variants from one Dockerfile, the training image apart, and every
pinned requirement inside the ranges of pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def instructions(name: str) -> str:
    """A Dockerfile without comments and with continuation lines joined."""
    lines = (ROOT / name).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    return text.replace("\\\n", " ")


def pins(name: str) -> list[Requirement]:
    """The requirements of ``deploy/<name>``, following ``-r`` includes."""
    found = []
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += pins(line[3:].strip())
        elif line:
            found.append(Requirement(line))
    return found


def declared() -> dict[str, list[Requirement]]:
    """pyproject's requirements by normalised name, from the dependencies and every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    everything = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        everything += extra
    by_name: dict[str, list[Requirement]] = {}
    for text in everything:
        requirement = Requirement(text)
        by_name.setdefault(_name(requirement.name), []).append(requirement)
    return by_name


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned_version(requirement: Requirement) -> str:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not pinned exactly"
    return spec.version


@pytest.mark.parametrize(
    "name",
    ["requirements-serve-cpu.txt", "requirements-serve-gpu.txt", "requirements-train.txt"],
)
def test_every_pin_is_exact_and_inside_pyproject_ranges(name: str) -> None:
    ranges = declared()
    for requirement in pins(name):
        version = _pinned_version(requirement)
        for allowed in ranges.get(_name(requirement.name), []):
            assert allowed.specifier.contains(version), f"{requirement} outside {allowed}"


def test_service_images_carry_no_torch_and_only_the_gpu_one_cuda() -> None:
    cpu = {_name(r.name): r for r in pins("requirements-serve-cpu.txt")}
    gpu = {_name(r.name): r for r in pins("requirements-serve-gpu.txt")}
    assert "torch" not in cpu and "torch" not in gpu
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert not any(name.startswith("nvidia") for name in cpu)
    assert "onnxruntime" not in gpu  # installing it after onnxruntime-gpu would replace it
    assert gpu["onnxruntime-gpu"].extras == {"cuda", "cudnn"}
    assert _pinned_version(cpu["onnxruntime"]) == _pinned_version(gpu["onnxruntime-gpu"])
    serving = declared()
    for name in ("fastapi", "fastapi-offline", "uvicorn", "redis", "prometheus-client"):
        assert name in cpu and name in gpu and name in serving


def test_service_dockerfile_is_one_chain_from_the_base_image() -> None:
    text = instructions("Dockerfile")
    assert "# syntax" not in (ROOT / "Dockerfile").read_text()  # needs no registry but the base
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.MULTILINE)
    assert stages == [("${PYTHON_IMAGE}", "build"), ("${PYTHON_IMAGE}", "service")]
    assert "torch" not in text and "training" not in text.split("AS service", 1)[1]
    build = text.split("AS build", 1)[1].split("FROM ", 1)[0]
    assert 'pip install --no-cache-dir -r "requirements-serve-${VARIANT}.txt"' in build
    assert re.search(r"^ARG VARIANT=gpu$", build, re.MULTILINE)


def test_service_image_is_non_root_with_the_default_model_and_a_healthcheck() -> None:
    service = instructions("Dockerfile").split("AS service", 1)[1]
    assert re.search(r"^USER 10001$", service, re.MULTILINE)
    assert "COPY models/co2-forecaster/1 /models/co2-forecaster/1" in service
    assert "/health/ready" in service.split("HEALTHCHECK", 1)[1].splitlines()[0]
    assert re.search(r"^EXPOSE 8000 8001$", service, re.MULTILINE)


def test_training_image_is_a_file_of_its_own() -> None:
    text = instructions("training.Dockerfile")
    assert re.findall(r"^FROM (.+)$", text, re.MULTILINE) == ["${PYTHON_IMAGE}"]
    assert '"torch==2.13.0"' in text and "requirements-train.txt" in text
    assert re.search(r"^USER 10001$", text, re.MULTILINE)
    assert "onnxruntime-gpu" not in (DEPLOY / "requirements-train.txt").read_text()
