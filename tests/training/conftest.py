"""Shared fixtures for the training tests: small random models and ONNX Runtime runners."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training.export import export_model
from training.model import ModelConfig, RecurrentModel

ModelFactory = Callable[..., RecurrentModel]
OrtRunner = Callable[..., list[np.ndarray]]


@pytest.fixture
def make_model() -> ModelFactory:
    """Build an eval-mode model with seeded random weights and (by default) non-trivial
    normalisation statistics, so that tests see raw values in and out."""

    def make(
        cell: str,
        *,
        input_size: int = 3,
        hidden_size: int = 8,
        output_size: int = 2,
        num_layers: int = 2,
        head: str = "regression",
        stats: bool = True,
        seed: int = 0,
    ) -> RecurrentModel:
        torch.manual_seed(seed)
        extra = {}
        if stats:
            extra = {
                "input_mean": tuple(float(v) for v in torch.linspace(-2.0, 3.0, input_size)),
                "input_std": tuple(float(v) for v in torch.linspace(0.5, 2.0, input_size)),
                "output_mean": tuple(float(v) for v in torch.linspace(10.0, -4.0, output_size)),
                "output_std": tuple(float(v) for v in torch.linspace(3.0, 0.25, output_size)),
            }
        config = ModelConfig(
            cell=cell,
            input_size=input_size,
            hidden_size=hidden_size,
            output_size=output_size,
            num_layers=num_layers,
            head=head,  # type: ignore[arg-type]
            **extra,
        )
        return RecurrentModel(config).eval()

    return make


@pytest.fixture
def ort_session() -> Callable[[onnx.ModelProto | bytes | Path], ort.InferenceSession]:
    """An ONNX Runtime CPU session from a model proto, its bytes or a file."""

    def session(model: onnx.ModelProto | bytes | Path) -> ort.InferenceSession:
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"]
        )

    return session


@pytest.fixture
def run_ort() -> OrtRunner:
    """Run a session on torch tensors: ``run(session, x, lengths, state) -> [y, hn(, cn)]``."""

    def run(
        session: ort.InferenceSession,
        x: torch.Tensor,
        lengths: torch.Tensor,
        state: tuple[torch.Tensor, ...],
    ) -> list[np.ndarray]:
        feed = {"x": x.numpy(), "lengths": lengths.numpy()}
        feed |= {name: s.numpy() for name, s in zip(("h0", "c0"), state, strict=False)}
        return session.run(None, feed)

    return run


@pytest.fixture
def exported_model(tmp_path: Path, make_model: ModelFactory) -> Path:
    """A tiny GRU exported into ``tmp_path/models/tiny-gru/1`` (returns that folder)."""
    model = make_model("gru", hidden_size=6, num_layers=1)
    return export_model(
        model,
        tmp_path / "models" / "tiny-gru" / "1",
        name="tiny-gru",
        version=1,
        task={"name": "tiny", "description": "random weights"},
        training_summary={"parameters": model.parameter_count(), "epochs": 0},
        feature_names=["a", "b", "c"],
        output_names=["p", "q"],
        graph="scan",
    )
