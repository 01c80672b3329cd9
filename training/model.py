"""A stack of recurrent cells with a linear head, and the config that rebuilds it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.cells import CELLS, RecurrentCell, State, make_cell

HeadKind = Literal["regression", "multilabel", "classification"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored inside every checkpoint."""

    cell: str  # contract name of the cell: gru, gru-classic, gru1..3, mgu, mgu1..3, lstm
    input_size: int  # features per time step
    hidden_size: int  # units per recurrent layer
    output_size: int  # outputs per time step
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout between recurrent layers (training only)
    head: HeadKind = "regression"  # regression: raw values; otherwise logits
    # Normalisation fitted on the training split; the model takes and returns raw values.
    input_mean: tuple[float, ...] = field(default=())
    input_std: tuple[float, ...] = field(default=())
    output_mean: tuple[float, ...] = field(default=())
    output_std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
        for name in ("input_size", "hidden_size", "output_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_stats("input", self.input_size)
        self._check_stats("output", self.output_size)

    def _check_stats(self, side: str, size: int) -> None:
        mean, std = getattr(self, f"{side}_mean"), getattr(self, f"{side}_std")
        if len(mean) not in (0, size) or len(std) != len(mean):
            raise ValueError(f"{side}_mean and {side}_std must both have {size} values or none")
        if any(s <= 0 for s in std):
            raise ValueError(f"{side}_std values must be > 0")

    @property
    def num_states(self) -> int:
        return CELLS[self.cell].num_states

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        values = dict(data)
        for key in ("input_mean", "input_std", "output_mean", "output_std"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


def _stats(values: tuple[float, ...], size: int, default: float) -> Tensor:
    return torch.tensor(values if values else [default] * size, dtype=torch.float32)


class RecurrentModel(nn.Module):
    """``num_layers`` cells of one kind, dropout between them, and a linear head on every step.

    Inputs: x ``(B, T, n)`` raw values; lengths ``(B,)`` valid steps per row or None (all ``T``);
    state: a tuple of ``num_states`` tensors ``(L, B, m)`` or None for zeros.
    Outputs: y ``(B, T, o)`` (zero past each row's length) and the state at each row's length.
    """

    input_mean: Tensor  # (n,) buffers: normalisation fitted on the training split
    input_std: Tensor
    output_mean: Tensor  # (o,)
    output_std: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        sizes = [c.input_size] + [c.hidden_size] * (c.num_layers - 1)
        self.cells = nn.ModuleList(make_cell(c.cell, n, c.hidden_size) for n in sizes)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.output_size)
        self.register_buffer("input_mean", _stats(c.input_mean, c.input_size, 0.0))
        self.register_buffer("input_std", _stats(c.input_std, c.input_size, 1.0))
        self.register_buffer("output_mean", _stats(c.output_mean, c.output_size, 0.0))
        self.register_buffer("output_std", _stats(c.output_std, c.output_size, 1.0))

    def layers(self) -> list[RecurrentCell]:
        """The recurrent cells, first layer first."""
        return [cell for cell in self.cells if isinstance(cell, RecurrentCell)]

    def initial_state(self, batch: int, device: torch.device | None = None) -> State:
        c = self.config
        shape = (c.num_layers, batch, c.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in range(c.num_states))

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        y_norm, new_state = self.forward_normalized(x, lengths, state)
        y = y_norm
        if self.config.head == "regression":
            y = y_norm * self.output_std + self.output_mean
        return y * self._mask(x, lengths), new_state

    def forward_normalized(
        self, x: Tensor, lengths: Tensor | None = None, state: State | None = None
    ) -> tuple[Tensor, State]:
        """Like ``forward`` but returns the head's output before de-normalisation (for losses)."""
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, x.device)
        mask = self._mask(x, lengths)  # (B, T, 1)
        seq = (x - self.input_mean) / self.input_std  # (B, T, n)
        finals: list[list[Tensor]] = [[] for _ in range(self.config.num_states)]
        for layer, cell in enumerate(self.layers()):
            if layer > 0:
                seq = self.dropout(seq)
            seq, layer_state = self._run_layer(cell, seq, mask, tuple(s[layer] for s in state))
            for k, s in enumerate(layer_state):
                finals[k].append(s)
        y = self.head(seq) * mask  # (B, T, o)
        return y, tuple(torch.stack(f) for f in finals)

    @staticmethod
    def _mask(x: Tensor, lengths: Tensor | None) -> Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        if lengths is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
        return (steps[None, :] < lengths.to(x.device)[:, None]).unsqueeze(-1).to(x.dtype)

    @staticmethod
    def _run_layer(
        cell: RecurrentCell, seq: Tensor, mask: Tensor, state: State
    ) -> tuple[Tensor, State]:
        xp = cell.project_input(seq)  # (B, T, k*m), hoisted out of the loop
        outputs = []
        for t in range(seq.shape[1]):
            new = cell.recur(xp[:, t], state)
            keep = mask[:, t]  # (B, 1): rows past their length keep their state
            state = tuple(keep * n + (1 - keep) * s for n, s in zip(new, state, strict=True))
            outputs.append(state[0])
        return torch.stack(outputs, dim=1), state  # (B, T, m)

    def parameter_count(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
