"""The training loop: Adam on the normalised loss, early stopping on validation, a checkpoint."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from training.cells import CELLS
from training.checkpoint import Checkpoint, save_checkpoint
from training.model import ModelConfig, RecurrentModel
from training.tasks import TASKS, SequenceSplit, Task, TaskOptions, build_task

#: a validation loss must beat the best so far by this fraction to count as an improvement
MIN_RELATIVE_IMPROVEMENT = 1e-4


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run, fully determined by these fields."""

    cell: str = "gru"  # cell contract name (training.cells.CELLS)
    task: str = "co2"  # task name (training.tasks.TASKS)
    hidden_size: int = 48  # units per recurrent layer
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between recurrent layers
    epochs: int = 60  # most passes over the training split
    batch_size: int = 32  # sequences per optimiser step
    lr: float = 5e-3  # Adam learning rate
    clip_norm: float = 1.0  # gradients are rescaled to at most this global norm
    seed: int = 0  # seeds torch, numpy, random and the task's data
    device: str = "cpu"  # "cpu", or "cuda" / "cuda:N" when available
    # CPU threads for torch. Small recurrent models step fastest on one: their matrices are too
    # small to split, and on a busy machine a second thread mostly waits (9x slower measured here).
    threads: int = 1
    patience: int = 10  # stop after this many epochs without a better validation loss
    out: Path = Path("runs/latest")  # where checkpoint.pt, summary.json (and loss.png) go
    plot: bool = False  # also write loss.png with the loss curves
    progress: bool = True  # show a progress bar (only on a terminal)
    task_options: TaskOptions = field(default_factory=TaskOptions)  # seed is taken from `seed`

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for name in ("hidden_size", "num_layers", "epochs", "batch_size", "patience", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr > 0 and self.clip_norm > 0):
            raise ConfigError(f"lr and clip_norm must be > 0, got {self.lr} and {self.clip_norm}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass
class TrainResult:
    """What a run produced: the best model, where it was saved, its summary and its loss curves."""

    model: RecurrentModel
    checkpoint_path: Path
    summary: dict[str, Any]
    train_loss: list[float]
    validation_loss: list[float]


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, task: Task) -> RecurrentModel:
    norm = task.normalization
    model_config = ModelConfig(
        cell=config.cell,
        input_size=task.input_size,
        hidden_size=config.hidden_size,
        output_size=task.output_size,
        num_layers=config.num_layers,
        dropout=config.dropout,
        head=task.head,
        input_mean=norm.input_mean,
        input_std=norm.input_std,
        output_mean=norm.output_mean,
        output_std=norm.output_std,
    )
    return RecurrentModel(model_config)


def batch_loss(
    model: RecurrentModel, x: Tensor, y: Tensor, weight: Tensor, lengths: Tensor
) -> Tensor:
    """Weighted loss on the model's normalised output: MSE (regression) or BCE (multilabel).

    Returns the *sum* over steps of the per-step loss times its weight; divide by the weight sum.
    """
    out, _ = model.forward_normalized(x, lengths)  # (B, T, o)
    if model.config.head == "regression":
        mean, std = model.get_buffer("output_mean"), model.get_buffer("output_std")
        target = (y - mean) / std  # (B, T, o)
        per_step = ((out - target) ** 2).mean(dim=-1)  # (B, T)
    else:
        per_step = F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(dim=-1)
    return (per_step * weight).sum()


def _tensors(split: SequenceSplit, rows: np.ndarray, device: torch.device) -> tuple[Tensor, ...]:
    """The rows of a split, cut to their longest length, as tensors on ``device``."""
    steps = int(split.lengths[rows].max())
    arrays = (split.x[rows, :steps], split.y[rows, :steps], split.weight[rows, :steps])
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays)
    return (*tensors, torch.from_numpy(split.lengths[rows]).to(device))


def train_epoch(
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    split: SequenceSplit,
    config: TrainConfig,
    generator: torch.Generator,
) -> float:
    """One pass over the shuffled training split; returns the mean weighted loss."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(split.x.shape[0], generator=generator).numpy()
    total, weight_sum = 0.0, 0.0
    for start in range(0, len(order), config.batch_size):
        x, y, weight, lengths = _tensors(split, order[start : start + config.batch_size], device)
        loss_sum = batch_loss(model, x, y, weight, lengths)
        optimizer.zero_grad()
        torch.autograd.backward(loss_sum / weight.sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        total += loss_sum.item()
        weight_sum += weight.sum().item()
    return total / weight_sum


@torch.no_grad()
def evaluate_loss(model: RecurrentModel, split: SequenceSplit, batch_size: int = 256) -> float:
    """The mean weighted loss over a split (state from zero on each row)."""
    model.eval()
    device = next(model.parameters()).device
    total, weight_sum = 0.0, 0.0
    for start in range(0, split.x.shape[0], batch_size):
        rows = np.arange(start, min(start + batch_size, split.x.shape[0]))
        x, y, weight, lengths = _tensors(split, rows, device)
        total += batch_loss(model, x, y, weight, lengths).item()
        weight_sum += weight.sum().item()
    return total / weight_sum


def train(config: TrainConfig) -> TrainResult:
    """Run one training: build the task and model, fit, keep the best weights, save everything."""
    device = resolve_device(config.device)
    config.out.mkdir(parents=True, exist_ok=True)  # fail now rather than after the training
    torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    task = build_task(config.task, replace(config.task_options, seed=config.seed))
    model = build_model(config, task).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    started = time.perf_counter()
    history = _fit(model, optimizer, task, config, generator)
    wall_time = time.perf_counter() - started

    model.load_state_dict(history.best_state)
    model.eval()
    summary = _summary(config, task, model, history, wall_time)
    checkpoint_path = _save(config, task, model, summary, history)
    return TrainResult(model, checkpoint_path, summary, history.train, history.validation)


@dataclass
class _History:
    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based
    best_state: dict[str, Tensor] = field(default_factory=dict)

    def record(self, model: RecurrentModel, train_loss: float, val_loss: float) -> None:
        self.train.append(train_loss)
        self.validation.append(val_loss)
        best = self.validation[self.best_epoch - 1] if self.best_epoch else float("inf")
        if val_loss < best * (1 - MIN_RELATIVE_IMPROVEMENT) or not self.best_epoch:
            self.best_epoch = len(self.validation)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def stalled(self, patience: int) -> bool:
        return len(self.validation) - self.best_epoch >= patience


def _fit(
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    task: Task,
    config: TrainConfig,
    generator: torch.Generator,
) -> _History:
    history = _History()
    show = config.progress and sys.stderr.isatty()
    bar = tqdm(range(config.epochs), desc=f"{config.cell} on {task.name}", disable=not show)
    for _ in bar:
        train_loss = train_epoch(model, optimizer, task.train, config, generator)
        val_loss = evaluate_loss(model, task.validation)
        history.record(model, train_loss, val_loss)
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=history.best_epoch)
        if history.stalled(config.patience):
            break
    bar.close()
    return history


def _summary(
    config: TrainConfig, task: Task, model: RecurrentModel, history: _History, wall_time: float
) -> dict[str, Any]:
    return {
        "cell": config.cell,
        "task": task.name,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "parameters": model.parameter_count(),
        "epochs_run": len(history.validation),
        "best_epoch": history.best_epoch,
        "best_validation_loss": history.validation[history.best_epoch - 1],
        "wall_time_s": round(wall_time, 3),
        "metrics": {
            "validation": task.evaluate(model, task.validation),
            "test": task.evaluate(model, task.test),
        },
        "data": task.data_sizes(),
        "hyperparameters": {
            "dropout": config.dropout,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "clip_norm": config.clip_norm,
            "patience": config.patience,
            "seed": config.seed,
            "device": config.device,
            "threads": config.threads,
        },
    }


def _save(
    config: TrainConfig,
    task: Task,
    model: RecurrentModel,
    summary: dict[str, Any],
    history: _History,
) -> Path:
    path = config.out / "checkpoint.pt"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(Checkpoint(model.config, state, task.describe(), summary), path)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.plot:
        plot_losses(history.train, history.validation, history.best_epoch, config.out / "loss.png")
    return path


def plot_losses(train: list[float], validation: list[float], best_epoch: int, path: Path) -> None:
    """Write the training and validation loss curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    epochs = range(1, len(train) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, train, label="train")
    ax.plot(epochs, validation, label="validation")
    ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best (epoch {best_epoch})")
    ax.set(xlabel="epoch", ylabel="loss (normalised)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
