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
