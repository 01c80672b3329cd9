"""The exported graph against torch, and the files ``export_model`` writes."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from training.cells import CELLS
from training.checkpoint import Checkpoint, save_checkpoint
from training.export import (
    AUTO_GRAPH,
    ExportError,
    check_parity,
    export_checkpoint,
    export_model,
)
from training.onnx_graph import NATIVE_CELLS, build_model_proto

FORMS = [pytest.param(cell, "scan", id=cell) for cell in CELLS] + [
    pytest.param(cell, "native", id=f"{cell}-native") for cell in NATIVE_CELLS
]


def _random_inputs(model, batch: int, steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, steps, c.input_size, generator=gen) * model.input_std + model.input_mean
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    lengths[0] = steps  # at least one full row
    shape = (c.num_layers, batch, c.hidden_size)
    state = tuple(torch.randn(shape, generator=gen) for _ in range(c.num_states))
    return x, lengths, state


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes += _all_nodes(attr.g)
    return nodes


@pytest.mark.parametrize(("cell", "form"), FORMS)
def test_onnx_runtime_matches_torch(make_model, ort_session, run_ort, cell: str, form: str) -> None:
    model = make_model(cell, hidden_size=12, num_layers=2)
    session = ort_session(build_model_proto(model, form))
    for batch in (1, 3, 64):
        for steps in (1, 7, 50):
            x, lengths, state = _random_inputs(model, batch, steps, seed=batch * 100 + steps)
            with torch.no_grad():
                y, final = model(x, lengths, state)
            got = run_ort(session, x, lengths, state)
            for expected, actual in zip([y, *final], got, strict=True):
                np.testing.assert_allclose(actual, expected.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("cell", "form"), FORMS)
def test_mixed_lengths_pad_with_zeros_and_keep_state(
    make_model, ort_session, run_ort, cell: str, form: str
) -> None:
    model = make_model(cell)
    session = ort_session(build_model_proto(model, form))
    x, _, state = _random_inputs(model, 4, 9)
    lengths = torch.tensor([9, 1, 5, 8])
    y, *final = run_ort(session, x, lengths, state)
    for row, length in enumerate(lengths.tolist()):
        assert np.all(y[row, length:] == 0.0)
        # The row alone, cut at its length, must end in the same state as inside the batch.
        row_state = tuple(s[:, row : row + 1] for s in state)
        y_row, *final_row = run_ort(
            session, x[row : row + 1, :length], torch.tensor([length]), row_state
        )
        np.testing.assert_allclose(y[row, :length], y_row[0], atol=1e-5, rtol=0)
        for batched, alone in zip(final, final_row, strict=True):
            np.testing.assert_allclose(batched[:, row], alone[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("cell", "form"), FORMS)
def test_chunked_feeding_equals_whole_sequence(
    make_model, ort_session, run_ort, cell: str, form: str
) -> None:
    model = make_model(cell)
    session = ort_session(build_model_proto(model, form))
    steps = 40
    x, _, state = _random_inputs(model, 2, steps)
    full = torch.full((2,), steps)
    y_whole, *final_whole = run_ort(session, x, full, state)
    rng = np.random.default_rng(7)
    pieces, carried, start = [], state, 0
    while start < steps:
        size = int(min(rng.integers(1, 9), steps - start))
        chunk = x[:, start : start + size]
        y, *new_state = run_ort(session, chunk, torch.full((2,), size), carried)
        pieces.append(y)
        carried = tuple(torch.from_numpy(s) for s in new_state)
        start += size
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), y_whole, atol=1e-5, rtol=0)
    for chunked, whole in zip(carried, final_whole, strict=True):
        np.testing.assert_allclose(chunked.numpy(), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("cell", "form"), FORMS)
def test_graph_structure(make_model, cell: str, form: str) -> None:
    proto = build_model_proto(make_model(cell, num_layers=1), form)
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in _all_nodes(proto.graph)]
    expected = "Scan" if form == "scan" else cell.upper()
    assert ops.count(expected) == 1
    assert not [op for op in ops if op in ("Loop", "If") or op.startswith("Sequence")]
    x_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in x_dims] == ["batch", "time", 3]
    # The graph does not grow with T (it has no T) and grows by a fixed amount per layer.
    two_layers = build_model_proto(make_model(cell, num_layers=2), form)
    three_layers = build_model_proto(make_model(cell, num_layers=3), form)
    per_layer = len(_all_nodes(two_layers.graph)) - len(ops)
    assert len(_all_nodes(three_layers.graph)) - len(_all_nodes(two_layers.graph)) == per_layer


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_normalisation_is_inside_the_graph(make_model, ort_session, run_ort, head: str) -> None:
    model = make_model("mgu", head=head, num_layers=1)
    session = ort_session(build_model_proto(model))
    assert [i.name for i in session.get_inputs()] == ["x", "h0", "lengths"]
    x, lengths, state = _random_inputs(model, 3, 5)
    # Reference computed by hand from the raw input: normalise, run the layers, de-normalise.
    with torch.no_grad():
        y_norm, _ = model.forward_normalized(x, lengths, state)
        if head == "regression":
            y_norm = y_norm * model.output_std + model.output_mean
        y_ref = y_norm * (torch.arange(5)[None, :, None] < lengths[:, None, None])
    y, _ = run_ort(session, x, lengths, state)
    np.testing.assert_allclose(y, y_ref.numpy(), atol=1e-5, rtol=0)
    if head == "classification":  # logits stay logits: no de-normalisation
        plain = make_model("mgu", head=head, num_layers=1, stats=False)
        plain.load_state_dict(model.state_dict() | {"output_mean": plain.output_mean,
                                                    "output_std": plain.output_std})  # fmt: skip
        y_plain, _ = run_ort(ort_session(build_model_proto(plain)), x, lengths, state)
        np.testing.assert_allclose(y, y_plain, atol=1e-6, rtol=0)


def test_metadata_fields_and_checksum(exported_model: Path, make_model) -> None:
    metadata = json.loads((exported_model / "metadata.json").read_text())
    payload = (exported_model / "model.onnx").read_bytes()
    assert metadata["sha256"] == hashlib.sha256(payload).hexdigest()
    created = datetime.fromisoformat(metadata["created_at"])
    assert created.utcoffset() == timedelta(0)
    model = make_model("gru", hidden_size=6, num_layers=1)
    assert metadata | {"sha256": "", "created_at": ""} == {
        "schema_version": 1,
        "name": "tiny-gru",
        "version": 1,
        "cell": "gru",
        "graph": "scan",
        "num_layers": 1,
        "hidden_size": 6,
        "input_size": 3,
        "output_size": 2,
        "head": "regression",
        "state_inputs": ["h0"],
        "state_outputs": ["hn"],
        "feature_names": ["a", "b", "c"],
        "output_names": ["p", "q"],
        "task": {"name": "tiny", "description": "random weights"},
        "normalization": {
            key: pytest.approx(list(getattr(model.config, key)))
            for key in ("input_mean", "input_std", "output_mean", "output_std")
        },
        "training": {"parameters": model.parameter_count(), "epochs": 0},
        "opset": 17,
        "sha256": "",
        "created_at": "",
    }


def test_exported_file_runs_like_torch(exported_model: Path, make_model, ort_session, run_ort):
    model = make_model("gru", hidden_size=6, num_layers=1)
    x, lengths, state = _random_inputs(model, 2, 4)
    with torch.no_grad():
        y, _ = model(x, lengths, state)
    got, _ = run_ort(ort_session(exported_model / "model.onnx"), x, lengths, state)
    np.testing.assert_allclose(got, y.numpy(), atol=1e-5, rtol=0)


def test_lstm_metadata_names_both_states(tmp_path: Path, make_model) -> None:
    out = export_model(make_model("lstm"), tmp_path / "m", name="l", version=3, graph="native")
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["state_inputs"], metadata["state_outputs"]) == (["h0", "c0"], ["hn", "cn"])
    assert metadata["graph"] == "native"
    assert metadata["feature_names"] == ["x0", "x1", "x2"]


@pytest.mark.parametrize("cell", ["gru", "lstm", "mgu"])
def test_auto_uses_the_measured_table(tmp_path: Path, make_model, cell: str) -> None:
    out = export_model(make_model(cell), tmp_path / cell, name=cell, version=1)
    assert json.loads((out / "metadata.json").read_text())["graph"] == AUTO_GRAPH.get(cell, "scan")


def test_parity_check_rejects_a_wrong_graph(make_model) -> None:
    wrong = build_model_proto(make_model("gru", seed=1)).SerializeToString()
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(make_model("gru", seed=2), wrong)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"name": "Bad Name"}, "invalid model name 'Bad Name'", id="uppercase-name"),
        pytest.param({"name": "-x"}, "invalid model name '-x'", id="leading-dash"),
        pytest.param({"name": ""}, "invalid model name ''", id="empty-name"),
        pytest.param({"version": 0}, "invalid model version 0", id="version-zero"),
        pytest.param({"version": "2"}, "invalid model version '2'", id="version-string"),
        pytest.param({"version": True}, "invalid model version True", id="version-bool"),
        pytest.param({"graph": "fast"}, "unknown graph form 'fast'", id="unknown-graph"),
        pytest.param({"cell": "mgu", "graph": "native"}, "exists only for", id="native-mgu"),
        pytest.param({"feature_names": ["a"]}, "feature_names must be 3 strings", id="features"),
        pytest.param({"task": {"bad": {1, 2}}}, "metadata is not plain JSON", id="task-json"),
    ],
)
def test_export_model_rejects(tmp_path: Path, make_model, kwargs: dict, message: str) -> None:
    model = make_model(kwargs.pop("cell", "gru"))
    args = {"name": "ok", "version": 1} | kwargs
    with pytest.raises(ExportError, match=message):
        export_model(model, tmp_path / "out", **args)
    assert not (tmp_path / "out" / "model.onnx").exists()


def _checkpoint(tmp_path: Path, make_model) -> Path:
    model = make_model("mgu1", num_layers=1)
    task = {"name": "toy", "description": "d", "feature_names": ["u", "v", "w"],
            "output_names": ["o1", "o2"]}  # fmt: skip
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(Checkpoint(model.config, model.state_dict(), task, {"epochs": 2}), path)
    return path


def test_export_checkpoint_takes_name_and_version_from_the_path(tmp_path: Path, make_model):
    out = export_checkpoint(_checkpoint(tmp_path, make_model), tmp_path / "models" / "toy-m" / "4")
    metadata = json.loads((out / "metadata.json").read_text())
    assert (metadata["name"], metadata["version"], metadata["cell"]) == ("toy-m", 4, "mgu1")
    assert metadata["feature_names"] == ["u", "v", "w"]
    assert metadata["output_names"] == ["o1", "o2"]
    assert metadata["task"] == {"name": "toy", "description": "d"}
    assert metadata["training"] == {"epochs": 2}


def test_export_checkpoint_errors(tmp_path: Path, make_model) -> None:
    checkpoint = _checkpoint(tmp_path, make_model)
    with pytest.raises(ExportError, match="cannot take a version from"):
        export_checkpoint(checkpoint, tmp_path / "models" / "toy" / "latest")
    with pytest.raises(ExportError, match="invalid model name 'Toy'"):
        export_checkpoint(checkpoint, tmp_path / "models" / "Toy" / "1")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "models" / "toy" / "1")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="not a readable checkpoint"):
        export_checkpoint(garbage, tmp_path / "models" / "toy" / "1")
