"""Checkpoints: the model's weights with everything needed to rebuild, evaluate and export it."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.model import ModelConfig, RecurrentModel

CHECKPOINT_FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """What ``torch.save`` writes at the end of training (as a plain dict, see ``to_dict``)."""

    config: ModelConfig  # rebuilds the model
    state_dict: dict[str, torch.Tensor]  # the model's weights and normalisation buffers
    task: dict[str, Any] = field(default_factory=dict)  # name, description, feature/output names
    summary: dict[str, Any] = field(default_factory=dict)  # the training run's final summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": self.state_dict,
            "task": self.task,
            "summary": self.summary,
        }

    def build_model(self) -> RecurrentModel:
        model = RecurrentModel(self.config)
        model.load_state_dict(self.state_dict)
        return model.eval()


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint.to_dict(), path)


def _first_line(exc: Exception) -> str:
    """torch's load errors run to many lines of advice; a CLI error must stay on one line."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a file written by torch.save, or one holding more than tensors and plain data"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint, turning every way it can be broken into one clear ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is not a readable checkpoint: {_first_line(exc)}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} checkpoint")
    try:
        checkpoint = Checkpoint(
            config=ModelConfig.from_dict(data["config"]),
            state_dict=data["state_dict"],
            task=dict(data.get("task", {})),
            summary=dict(data.get("summary", {})),
        )
        checkpoint.build_model()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is inconsistent: {exc}") from None
    return checkpoint
