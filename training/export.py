"""Export a trained model to ``models/<name>/<version>/{model.onnx, metadata.json}``.

The layout and every metadata field are specified in ``docs/reference/model-format.md``. An export
succeeds only when ``onnx.checker`` accepts the graph and ONNX Runtime reproduces torch on a random
batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.checkpoint import CheckpointError, load_checkpoint
from training.model import RecurrentModel
from training.onnx_graph import (
    GRAPH_FORMS,
    NATIVE_CELLS,
    OPSET,
    build_model_proto,
    state_names,
)

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")

#: ``graph="auto"``: the form that ran faster in ONNX Runtime on the CPU, per cell, measured with
#: ``python bench/bench_cells.py`` (2-core AMD EPYC, ORT 1.31, one layer, input 8, hidden 128/512):
#: - gru: scan is 1.2-1.7x faster for one step at batch 64 and 1,024 and 6% faster on 256-step
#:   sequences at hidden 512; native is 4% faster on them at hidden 128 and ~25% at batch 1.
#:   Serving batches steps across sessions, so scan.
#: - lstm: native is 20-25% faster at batch 1 and 1.2-3x faster on sequences (the op keeps the
#:   four gates fused); scan wins only some batched single steps.
#: Cells without a native ONNX op always use scan.
AUTO_GRAPH: dict[str, str] = {"gru": "scan", "lstm": "native"}

#: ONNX Runtime must match torch this closely (relative to the output's scale) to accept an export
PARITY_TOLERANCE = 1e-4


class ExportError(Exception):
    """An export that cannot be done; the message says what was wrong and how to fix it."""


def resolve_graph(cell: str, graph: str) -> str:
    """Turn ``auto``/``scan``/``native`` into the form written for ``cell``."""
    if graph == "auto":
        return AUTO_GRAPH.get(cell, "scan")
    if graph not in GRAPH_FORMS:
        choices = ", ".join(("auto", *GRAPH_FORMS))
        raise ExportError(f"unknown graph form {graph!r}; choose one of {choices}")
    if graph == "native" and cell not in NATIVE_CELLS:
        raise ExportError(
            f"graph 'native' exists only for the {' and '.join(NATIVE_CELLS)} cells; "
            f"a {cell!r} model can only be exported as 'scan' (or 'auto')"
        )
    return graph


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ExportError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def refuse_to_overwrite(out_dir: Path, force: bool) -> None:
    """Raise ExportError if ``out_dir`` already holds a model version and ``force`` is off."""
    existing = [name for name in ("model.onnx", "metadata.json") if (out_dir / name).exists()]
    if existing and not force:
        raise ExportError(
            f"{out_dir} already holds a model version ({', '.join(existing)}); export to a new "
            "version folder (e.g. the next number) or pass --force to overwrite it"
        )


def validate_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"invalid model version {version!r}: it must be a positive integer")
    return version


def export_model(
    model: RecurrentModel,
    out_dir: Path,
    *,
    name: str,
    version: int,
    task: dict[str, Any] | None = None,
    training_summary: dict[str, Any] | None = None,
    feature_names: list[str] | None = None,
    output_names: list[str] | None = None,
    graph: str = "auto",
    force: bool = False,
) -> Path:
    """Write ``out_dir/model.onnx`` and ``out_dir/metadata.json``; return ``out_dir``.

    Raises ExportError if an argument is invalid, if ``out_dir`` already holds a model version
    (unless ``force``: a served version should never change under the same number), or if ONNX
    Runtime does not reproduce torch.
    """
    c = model.config
    validate_name(name)
    validate_version(version)
    refuse_to_overwrite(out_dir, force)
    form = resolve_graph(c.cell, graph)
    features = _names("feature_names", feature_names, "x", c.input_size)
    outputs = _names("output_names", output_names, "y", c.output_size)
    was_training = model.training
    model.eval()
    try:
        proto = build_model_proto(model, form)
        onnx.checker.check_model(proto, full_check=True)
        payload = proto.SerializeToString()
        check_parity(model, payload)
    finally:
        model.train(was_training)
    metadata = build_metadata(
        model, name=name, version=version, graph=form, sha256=hashlib.sha256(payload).hexdigest()
    )
    metadata |= {
        "feature_names": features,
        "output_names": outputs,
        "task": _public_task(task),
        "training": dict(training_summary or {}),
    }
    _write_atomically(out_dir, payload, _to_json(metadata))
    return out_dir


def export_checkpoint(
    checkpoint_path: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    version: int | None = None,
    graph: str = "auto",
    force: bool = False,
) -> Path:
    """Export a training checkpoint. ``name`` and ``version`` default to ``out_dir``'s last two
    components, as in ``models/<name>/<version>/``."""
    if name is None:
        name = out_dir.resolve().parent.name
    if version is None:
        version = _version_from_path(out_dir)
    validate_name(name)
    refuse_to_overwrite(out_dir, force)
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    task = checkpoint.task
    return export_model(
        checkpoint.build_model(),
        out_dir,
        name=name,
        version=version,
        task=task,
        training_summary=checkpoint.summary,
        feature_names=task.get("feature_names"),
        output_names=task.get("output_names"),
        graph=graph,
        force=force,
    )


def build_metadata(
    model: RecurrentModel, *, name: str, version: int, graph: str, sha256: str
) -> dict[str, Any]:
    """The fields of metadata.json that follow from the model and the graph."""
    c = model.config
    state_in, state_out = state_names(c.num_states)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "cell": c.cell,
        "graph": graph,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "input_size": c.input_size,
        "output_size": c.output_size,
        "head": c.head,
        "state_inputs": state_in,
        "state_outputs": state_out,
        "normalization": {
            key: [float(v) for v in model.get_buffer(key).tolist()]
            for key in ("input_mean", "input_std", "output_mean", "output_std")
        },
        "opset": OPSET,
        "sha256": sha256,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def check_parity(model: RecurrentModel, payload: bytes, seed: int = 0) -> float:
    """Run torch and ONNX Runtime on one random batch with mixed lengths and a random state.

    Returns the largest difference relative to the output scale; raises ExportError above
    ``PARITY_TOLERANCE``.
    """
    feed, inputs = _random_batch(model, seed)
    with torch.no_grad():
        y, state = model(*inputs)
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    got = session.run(None, feed)
    names = ["y", *state_names(model.config.num_states)[1]]
    worst = 0.0
    for out_name, expected, actual in zip(names, [y, *state], got, strict=True):
        expected_np = expected.numpy()
        scale = max(1.0, float(np.abs(expected_np).max()))
        error = float(np.abs(actual - expected_np).max()) / scale
        if not error <= PARITY_TOLERANCE:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime output {out_name!r} differs from torch by {error:.3g} "
                f"(relative; tolerance {PARITY_TOLERANCE:g}); the export is wrong"
            )
        worst = max(worst, error)
    return worst


def _random_batch(
    model: RecurrentModel, seed: int
) -> tuple[dict[str, np.ndarray], tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]]:
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    batch, steps = 3, 6
    x = torch.randn(batch, steps, c.input_size, generator=gen)
    x = x * model.get_buffer("input_std") + model.get_buffer("input_mean")  # raw values
    lengths = torch.tensor([steps, 1, steps // 2])
    shape = (c.num_layers, batch, c.hidden_size)
    state = tuple(0.5 * torch.randn(shape, generator=gen) for _ in range(c.num_states))
    feed = {"x": x.numpy(), "lengths": lengths.numpy()}
    feed |= {name: s.numpy() for name, s in zip(state_names(c.num_states)[0], state, strict=True)}
    return feed, (x, lengths, state)


def _names(field: str, names: list[str] | None, prefix: str, size: int) -> list[str]:
    if names is None:
        return [f"{prefix}{i}" for i in range(size)]
    names = list(names)
    if len(names) != size or not all(isinstance(n, str) for n in names):
        raise ExportError(f"{field} must be {size} strings (one per column), got {names!r}")
    return names


def _public_task(task: dict[str, Any] | None) -> dict[str, Any]:
    """The task's description; the column names go to their own metadata fields."""
    return {k: v for k, v in (task or {}).items() if k not in ("feature_names", "output_names")}


def _to_json(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ExportError(f"metadata is not plain JSON (task or training summary): {exc}") from None


def _version_from_path(out_dir: Path) -> int:
    try:
        return int(out_dir.name)
    except ValueError:
        raise ExportError(
            f"cannot take a version from {str(out_dir)!r}: export into models/<name>/<version>/ "
            "or pass the version explicitly"
        ) from None


def _write_atomically(out_dir: Path, payload: bytes, metadata: str) -> None:
    """Write both files under temporary names, then rename, so a reader never sees half a file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for filename, data in (("model.onnx", payload), ("metadata.json", metadata.encode())):
            tmp = out_dir / f".{filename}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out_dir / filename)
    except OSError as exc:
        raise ExportError(f"cannot write the model to {out_dir}: {exc}") from None
