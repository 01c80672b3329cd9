"""Find and validate the models under ``models/<name>/<version>/``.

Validation covers metadata.json (schema), model.onnx (onnx.checker, the sha256 recorded in the
metadata, and graph inputs/outputs matching the names and sizes the metadata declares). A broken
model version is reported with its reason and skipped; the others still load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from pydantic import ValidationError

from service.engine.metadata import MODEL_NAME_PATTERN, ModelMetadata

logger = logging.getLogger(__name__)

FLOAT = int(onnx.TensorProto.FLOAT)
INT64 = int(onnx.TensorProto.INT64)
ANY = None  # a dimension that may be dynamic
Signature = dict[str, tuple[int, list[int | None]]]  # name -> (element type, dims)


class ModelLoadError(Exception):
    """A model version that cannot be served; the message names the folder and the problem."""


@dataclass(frozen=True)
class ModelSpec:
    """A validated model version on disk."""

    metadata: ModelMetadata
    onnx_path: Path


@dataclass(frozen=True)
class SkippedModel:
    """A model version that failed validation, and why."""

    path: Path
    reason: str


def scan_models_dir(models_dir: Path) -> tuple[list[ModelSpec], list[SkippedModel]]:
    """Validate every ``<name>/<version>`` folder; return the good ones and the skipped ones."""
    specs: list[ModelSpec] = []
    skipped: list[SkippedModel] = []
    for version_dir in _version_dirs(models_dir, skipped):
        try:
            specs.append(read_model_dir(version_dir))
        except ModelLoadError as exc:
            skipped.append(SkippedModel(version_dir, str(exc)))
    for skip in skipped:
        logger.error("skipping model %s: %s", skip.path, skip.reason)
    return specs, skipped


def _version_dirs(models_dir: Path, skipped: list[SkippedModel]) -> list[Path]:
    found = []
    for name_dir in model_dirs(models_dir, skipped):
        found += version_dirs(name_dir, skipped)
    return found


def model_dirs(models_dir: Path, skipped: list[SkippedModel]) -> list[Path]:
    """The ``<name>`` folders with a valid model name, sorted; the others go to ``skipped``."""
    found = []
    for name_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        if not re.match(MODEL_NAME_PATTERN, name_dir.name):
            skipped.append(SkippedModel(name_dir, f"{name_dir.name!r} is not a valid model name"))
            continue
        found.append(name_dir)
    return found


def version_dirs(name_dir: Path, skipped: list[SkippedModel]) -> list[Path]:
    """The ``<version>`` folders of one model, sorted; folders not named by a positive integer go
    to ``skipped``."""
    found = []
    for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir()):
        if not (version_dir.name.isdigit() and int(version_dir.name) >= 1):
            reason = f"version folder {version_dir.name!r} is not a positive integer"
            skipped.append(SkippedModel(version_dir, reason))
            continue
        found.append(version_dir)
    return found


def read_model_dir(version_dir: Path) -> ModelSpec:
    """Validate one ``<name>/<version>`` folder; raise ``ModelLoadError`` naming the problem."""
    metadata = _read_metadata(version_dir / "metadata.json")
    if metadata.name != version_dir.parent.name or metadata.version != int(version_dir.name):
        raise ModelLoadError(
            f"metadata.json says {metadata.name}/{metadata.version} but the folder is "
            f"{version_dir.parent.name}/{version_dir.name}"
        )
    onnx_path = version_dir / "model.onnx"
    _check_onnx(onnx_path, metadata)
    return ModelSpec(metadata=metadata, onnx_path=onnx_path)


def _read_metadata(path: Path) -> ModelMetadata:
    if not path.is_file():
        raise ModelLoadError(f"{path.name} is missing")
    try:
        return ModelMetadata.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path.name} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'metadata'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelLoadError(f"{path.name} is invalid: {problems}") from None


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """The sha256 of a file, read a block at a time (a model file may be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _check_onnx(path: Path, metadata: ModelMetadata) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{path.name} is missing")
    digest = file_sha256(path)
    if digest != metadata.sha256:
        raise ModelLoadError(
            f"sha256 of {path.name} is {digest}, metadata.json records {metadata.sha256}"
        )
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several types for a broken file
        raise ModelLoadError(f"{path.name} fails the ONNX checker: {exc}") from None
    _check_signature(model.graph, metadata)


def _expected_io(metadata: ModelMetadata) -> tuple[Signature, Signature]:
    m = metadata
    state: tuple[int, list[int | None]] = (FLOAT, [m.num_layers, ANY, m.hidden_size])
    inputs: Signature = {"x": (FLOAT, [ANY, ANY, m.input_size]), "lengths": (INT64, [ANY])}
    inputs.update({name: state for name in m.state_inputs})
    outputs: Signature = {"y": (FLOAT, [ANY, ANY, m.output_size])}
    outputs.update({name: state for name in m.state_outputs})
    return inputs, outputs


def _check_signature(graph: onnx.GraphProto, metadata: ModelMetadata) -> None:
    expected_inputs, expected_outputs = _expected_io(metadata)
    initializers = {init.name for init in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in initializers}
    outputs = {v.name: v for v in graph.output}
    if set(inputs) != set(expected_inputs):
        raise ModelLoadError(
            f"graph inputs are {sorted(inputs)}, metadata implies {sorted(expected_inputs)}"
        )
    missing = set(expected_outputs) - set(outputs)
    if missing:
        raise ModelLoadError(f"graph outputs {sorted(missing)} are missing (has {sorted(outputs)})")
    for name, (dtype, dims) in {**expected_inputs, **expected_outputs}.items():
        _check_value(inputs.get(name) or outputs[name], dtype, dims)


def _check_value(value: onnx.ValueInfoProto, dtype: int, dims: list[int | None]) -> None:
    tensor = value.type.tensor_type
    if tensor.elem_type != dtype:
        found = onnx.TensorProto.DataType.Name(tensor.elem_type)
        wanted = onnx.TensorProto.DataType.Name(dtype)
        raise ModelLoadError(f"graph value {value.name!r} has type {found}, expected {wanted}")
    if not tensor.HasField("shape"):
        return
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(shape) != len(dims):
        raise ModelLoadError(
            f"graph value {value.name!r} has rank {len(shape)}, expected {len(dims)}"
        )
    for axis, (got, want) in enumerate(zip(shape, dims, strict=True)):
        if want is not None and got is not None and got != want:
            raise ModelLoadError(
                f"graph value {value.name!r} has size {got} on axis {axis}, metadata implies {want}"
            )
