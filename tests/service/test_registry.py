"""Model discovery and validation: broken versions are skipped with a reason, the rest load."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
from model_files import (
    break_sha,
    edit_metadata,
    garbage_onnx,
    symbolic_hidden_size,
    symbolic_output_size,
)

from service.engine.registry import ModelLoadError, read_model_dir, scan_models_dir
from service.engine.runtime import ModelRuntime

if TYPE_CHECKING:
    from conftest import TestClient, TinyGRU


def break_json(folder: Path) -> None:
    (folder / "metadata.json").write_text("{oops")


def drop_onnx(folder: Path) -> None:
    (folder / "model.onnx").unlink()


def wrong_schema(folder: Path) -> None:
    edit_metadata(folder, schema_version=2)


def wrong_input_size(folder: Path) -> None:
    edit_metadata(folder, input_size=3, feature_names=["a", "b", "c"])


def wrong_state_names(folder: Path) -> None:
    edit_metadata(folder, state_inputs=["state"], state_outputs=["state_out"])


def wrong_name(folder: Path) -> None:
    edit_metadata(folder, name="other")


BREAKAGES = [
    pytest.param(break_sha, "sha256 of model.onnx is", id="sha256"),
    pytest.param(break_json, "metadata.json is not valid JSON", id="json"),
    pytest.param(drop_onnx, "model.onnx is missing", id="no-onnx"),
    pytest.param(wrong_schema, "schema_version: Input should be 1", id="schema"),
    pytest.param(wrong_input_size, "has size 2 on axis 2, metadata implies 3", id="input-size"),
    pytest.param(wrong_state_names, "graph inputs are ['h0', 'lengths', 'x']", id="state-names"),
    pytest.param(wrong_name, "metadata.json says other/1 but the folder is good/1", id="name"),
    pytest.param(garbage_onnx, "fails the ONNX checker", id="garbage"),
]


@pytest.mark.parametrize(("breakage", "reason"), BREAKAGES)
def test_broken_model_is_skipped_with_its_reason(
    tmp_path: Path,
    breakage: Callable[[Path], None],
    reason: str,
    new_model: Callable[..., TinyGRU],
    add_model: Callable[..., Path],
) -> None:
    model = new_model(hidden_size=4, num_layers=1, seed=0)
    add_model(tmp_path, "fine", 1, model)
    broken = add_model(tmp_path, "good", 1, model)
    breakage(broken)
    specs, skipped = scan_models_dir(tmp_path)
    assert [(s.metadata.name, s.metadata.version) for s in specs] == [("fine", 1)]
    assert len(skipped) == 1 and skipped[0].path == broken
    assert reason in skipped[0].reason


def test_odd_folders_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "Bad Name" / "1").mkdir(parents=True)
    (tmp_path / "ok" / "latest").mkdir(parents=True)
    specs, skipped = scan_models_dir(tmp_path)
    assert specs == []
    reasons = sorted(s.reason for s in skipped)
    assert reasons == [
        "'Bad Name' is not a valid model name",
        "version folder 'latest' is not a positive integer",
    ]


def test_valid_model_reads(models_dir: Path) -> None:
    spec = read_model_dir(models_dir / "tiny" / "2")
    assert spec.metadata.hidden_size == 8 and spec.metadata.num_states == 1


def test_the_service_serves_the_good_models_beside_a_broken_one(
    tmp_path: Path,
    make_client: Callable[..., TestClient],
    new_model: Callable[..., TinyGRU],
    add_model: Callable[..., Path],
) -> None:
    model = new_model(hidden_size=4, num_layers=1, seed=0)
    add_model(tmp_path, "tiny", 1, model)
    break_sha(add_model(tmp_path, "tiny", 3, model))
    client = make_client(models_dir=tmp_path)
    assert [m["version"] for m in client.get("/v1/models").json()["models"]] == [1]
    created = client.post("/v1/sessions", json={"model": "tiny"}).json()
    assert created["version"] == 1  # the broken higher version is not the default


def test_not_ready_without_any_loadable_model(
    tmp_path: Path,
    make_client: Callable[..., TestClient],
    new_model: Callable[..., TinyGRU],
    add_model: Callable[..., Path],
) -> None:
    model = new_model(hidden_size=4, num_layers=1, seed=0)
    break_sha(add_model(tmp_path, "tiny", 1, model))
    client = make_client(wait_until_ready=False, models_dir=tmp_path)
    time.sleep(0.3)  # loading has finished (and found nothing) long before
    response = client.get("/health/ready")
    assert response.status_code == 503 and "not ready" in response.json()["error"]
    assert client.get("/health/live").status_code == 200
    models = client.get("/v1/models")
    assert models.status_code == 503 and models.headers["retry-after"] == "1"


def test_graph_checker_sees_onnx_file(models_dir: Path) -> None:
    onnx.checker.check_model(str(models_dir / "tiny" / "1" / "model.onnx"))


def test_a_model_whose_outputs_do_not_match_its_metadata_is_refused_at_load(
    tmp_path: Path,
    make_client: Callable[..., TestClient],
    new_model: Callable[..., TinyGRU],
    add_model: Callable[..., Path],
) -> None:
    model = new_model(hidden_size=4, num_layers=1, seed=0)
    add_model(tmp_path, "tiny", 1, model)
    symbolic_hidden_size(add_model(tmp_path, "tiny", 2, model), claimed=16)
    assert read_model_dir(tmp_path / "tiny" / "2").metadata.hidden_size == 16  # files look fine
    client = make_client(models_dir=tmp_path)
    assert [m["version"] for m in client.get("/v1/models").json()["models"]] == [1]
    index = client.post("/v2/repository/index", json={}).json()
    refused = next(entry for entry in index if entry["version"] == "2")
    assert refused["state"] == "UNAVAILABLE"
    # The native GRU op refuses the claimed state size outright; other graphs answer with a
    # state of the true size, which the probe compares with the metadata.
    assert "fails a probe run" in refused["reason"] and "initial_h" in refused["reason"]


def test_the_probe_compares_output_shapes_with_the_metadata(
    tmp_path: Path, new_model: Callable[..., TinyGRU], add_model: Callable[..., Path]
) -> None:
    folder = add_model(tmp_path, "tiny", 1, new_model(hidden_size=4, num_layers=1, seed=0))
    symbolic_output_size(folder, claimed=3)
    runtime = ModelRuntime(read_model_dir(folder), ["CPUExecutionProvider"])
    with pytest.raises(
        ModelLoadError, match=r"y have shape \[2, 2, 1\], metadata.json implies \[2, 2, 3\]"
    ):
        runtime.probe()
