"""Models written by ``training.export`` load through the service's registry and serve what torch
computes: the two views of metadata.json cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from service.engine.registry import read_model_dir
from training.export import export_model
from training.model import ModelConfig, RecurrentModel

if TYPE_CHECKING:
    from conftest import TestClient

CASES = [
    pytest.param("gru", "native", 1, id="gru-native"),
    pytest.param("gru", "scan", 2, id="gru-scan"),
    pytest.param("lstm", "scan", 1, id="lstm-scan"),
    pytest.param("mgu", "scan", 2, id="mgu-scan"),
]


def build(cell: str, layers: int) -> RecurrentModel:
    torch.manual_seed(0)
    config = ModelConfig(
        cell=cell,
        input_size=2,
        hidden_size=6,
        output_size=1,
        num_layers=layers,
        input_mean=(1.0, -1.0),
        input_std=(2.0, 0.5),
        output_mean=(3.0,),
        output_std=(1.5,),
    )
    return RecurrentModel(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, RecurrentModel]]:
    root = tmp_path_factory.mktemp("exported")
    models = {}
    for case in CASES:
        cell, graph, layers = case.values
        name = f"{cell}-{graph}"
        models[name] = build(cell, layers)
        export_model(models[name], root / name / "1", name=name, version=1, graph=graph)
    return root, models


@pytest.mark.parametrize(("cell", "graph", "layers"), CASES)
def test_registry_accepts_the_export(
    exported: tuple[Path, dict[str, RecurrentModel]], cell: str, graph: str, layers: int
) -> None:
    root, _ = exported
    spec = read_model_dir(root / f"{cell}-{graph}" / "1")
    assert (spec.metadata.cell, spec.metadata.graph, spec.metadata.num_layers) == (
        cell,
        graph,
        layers,
    )
    assert spec.metadata.num_states == (2 if cell == "lstm" else 1)


def test_streaming_exported_models_matches_torch(
    exported: tuple[Path, dict[str, RecurrentModel]], make_client: Callable[..., TestClient]
) -> None:

    root, models = exported
    client = make_client(models_dir=root)
    assert len(client.get("/v1/models").json()["models"]) == len(CASES)
    rng = np.random.default_rng(0)
    for name, model in models.items():
        x = rng.normal(size=(11, 2)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)[None])[0][0].numpy()
        sid = client.post("/v1/sessions", json={"model": name}).json()["session_id"]
        outputs = []
        for chunk in np.split(x, [3, 4, 9]):
            reply = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk.tolist()})
            assert reply.status_code == 200, reply.text
            outputs += reply.json()["outputs"]
        np.testing.assert_allclose(outputs, expected, atol=1e-5, err_msg=name)
