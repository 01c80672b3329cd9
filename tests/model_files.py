"""Ways to break a model version folder on disk, shared by the registry and hot-reload tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def edit_metadata(folder: Path, **changes: object) -> None:
    path = folder / "metadata.json"
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def break_sha(folder: Path) -> None:
    """metadata.json records a sha256 that model.onnx does not have."""
    edit_metadata(folder, sha256="0" * 64)


def garbage_onnx(folder: Path) -> None:
    """model.onnx is not an ONNX file, and metadata.json records its sha256."""
    data = b"not an onnx file"
    (folder / "model.onnx").write_bytes(data)
    edit_metadata(folder, sha256=hashlib.sha256(data).hexdigest())


def symbolic_hidden_size(folder: Path, claimed: int) -> None:
    """The graph leaves the hidden size symbolic and metadata.json claims ``claimed``: only
    running the model shows the lie."""
    _symbolic(folder, {"h0": 2, "hn": 2}, hidden_size=claimed)


def symbolic_output_size(folder: Path, claimed: int) -> None:
    """The graph leaves the output size symbolic and metadata.json claims ``claimed``."""
    names = [f"y{i}" for i in range(claimed)]
    _symbolic(folder, {"y": 2}, output_size=claimed, output_names=names)


def _symbolic(folder: Path, axes: dict[str, int], **metadata: object) -> None:
    """Make the named graph values' axes symbolic and write ``metadata`` into metadata.json."""
    import onnx  # the training-free helpers above need no onnx

    path = folder / "model.onnx"
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in axes:
            value.type.tensor_type.shape.dim[axes[value.name]].dim_param = f"{value.name}_size"
    data = model.SerializeToString()
    path.write_bytes(data)
    edit_metadata(folder, sha256=hashlib.sha256(data).hexdigest(), **metadata)
