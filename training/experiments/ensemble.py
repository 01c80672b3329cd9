"""Train several seeds of one cell at once, as one wide block-diagonal model.

On a small CPU the cost of a recurrent step is mostly per operation, not per multiply: a hidden
size of 20 costs nearly what 100 does. :class:`SeedEnsemble` therefore lays ``S`` independent
models of hidden size ``H`` side by side in one :class:`RecurrentModel` of hidden size ``S * H``:

- every gate block of every cell parameter is split into ``S`` seed blocks of ``H`` units;
- ``weight_ih``, ``weight_hh`` and the head's weight are masked block-diagonal (a
  ``torch.nn.utils.parametrize`` mask), so seed ``s`` reads only its own inputs and units;
- each seed gets its own input columns, so seeds can see different data (shuffles);
- gradients are clipped per seed (:meth:`clip_grad_norm_`) and Adam is elementwise, so the seeds
  train exactly as they would alone (up to float summation order).

The cells are the project's own (``training.cells``): the ensemble only lays out their weights.
:meth:`member` cuts seed ``s`` back out as an ordinary model of hidden size ``H``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from training.model import ModelConfig, RecurrentModel


class _BlockMask(nn.Module):
    """A parametrization that zeroes every weight outside the seed-diagonal blocks."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def block_mask(blocks: int, seeds: int, rows: int, cols: int) -> Tensor:
    """``(blocks * seeds * rows, seeds * cols)``: 1 where a row's seed equals a column's seed."""
    eye = torch.eye(seeds)  # (S, S)
    one = eye[None, :, None, :, None].expand(blocks, seeds, rows, seeds, cols)  # (k, S, r, S, c)
    return one.reshape(blocks * seeds * rows, seeds * cols).contiguous()


def seed_block(wide: Tensor, index: int, seeds: int, rows: int, cols: int | None) -> Tensor:
    """The view of a wide tensor that belongs to seed ``index``.

    ``wide`` stacks ``k`` gate blocks along its first axis, each of ``seeds`` runs of ``rows``; a
    matrix (``cols`` given) also has ``seeds`` runs of ``cols`` columns. Returns ``(k, rows)`` or
    ``(k, rows, cols)``.
    """
    k = wide.shape[0] // (seeds * rows)
    if cols is None:
        return wide.view(k, seeds, rows)[:, index]
    return wide.view(k, seeds, rows, seeds * cols)[:, index, :, index * cols : (index + 1) * cols]


@dataclass(frozen=True)
class _Slot:
    """One parameter of the wide model and the shape of a seed's share of it."""

    module: nn.Module
    name: str
    rows: int  # a seed's run of rows within each gate block (H, or o for the head)
    cols: int | None  # a seed's run of columns (matrices), None for vectors

    def tensor(self) -> Tensor:
        """What the model uses: the masked weight where a mask is registered."""
        value: Tensor = getattr(self.module, self.name)
        return value

    def trainable(self) -> Tensor:
        """The leaf the optimiser updates (the unmasked original where a mask is registered)."""
        if parametrize.is_parametrized(self.module, self.name):
            original: Tensor = getattr(self.module.parametrizations, self.name).original
            return original
        return self.tensor()


class SeedEnsemble(nn.Module):
    """``len(seeds)`` one-layer models of one cell, trained together; see the module docstring.

    Args: config (one member's :class:`ModelConfig`: one layer; its normalisation is shared),
    seeds (each seeds its member's initial weights).
    Inputs: x ``(B, T, S, n)``. Outputs: ``(B, T, S, o)`` before the output de-normalisation
    (logits for a multilabel or classification head).
    """

    def __init__(self, config: ModelConfig, seeds: Sequence[int]) -> None:
        super().__init__()
        if not seeds:
            raise ValueError("SeedEnsemble: needs at least one seed")
        if config.num_layers != 1:
            raise ValueError(f"SeedEnsemble: one layer only, got {config.num_layers}")
        self.seeds = tuple(seeds)
        self.member_config = config
        s = len(self.seeds)
        self.wide = RecurrentModel(
            replace(
                config,
                input_size=s * config.input_size,
                hidden_size=s * config.hidden_size,
                output_size=s * config.output_size,
                input_mean=config.input_mean * s,
                input_std=config.input_std * s,
                output_mean=config.output_mean * s,
                output_std=config.output_std * s,
            )
        )
        members = []
        for seed in self.seeds:
            torch.manual_seed(seed)
            members.append(RecurrentModel(self.member_config))
        self.load_members(members)
        for slot in self._slots():
            if slot.cols is not None:
                mask = block_mask(
                    slot.tensor().shape[0] // (s * slot.rows), s, slot.rows, slot.cols
                )
                parametrize.register_parametrization(slot.module, slot.name, _BlockMask(mask))

    @property
    def size(self) -> int:
        return len(self.seeds)

    def _slots(self, model: RecurrentModel | None = None) -> list[_Slot]:
        """Every parameter of ``model`` (the wide one by default) with its seed layout."""
        c = self.member_config
        model = model or self.wide
        cell = model.layers()[0]
        columns = {"weight_ih": c.input_size, "weight_hh": c.hidden_size}
        names = [name for name, _ in RecurrentModel(c).layers()[0].named_parameters()]
        slots = [_Slot(cell, name, c.hidden_size, columns.get(name)) for name in names]
        head = model.head
        return [
            *slots,
            _Slot(head, "weight", c.output_size, c.hidden_size),
            _Slot(head, "bias", c.output_size, None),
        ]

    def load_members(self, members: Sequence[RecurrentModel]) -> None:
        """Copy each member's weights into its seed blocks (all other weights are zero)."""
        if len(members) != self.size:
            raise ValueError(f"SeedEnsemble: {self.size} seeds, got {len(members)} members")
        with torch.no_grad():
            for slot in self._slots():
                slot.trainable().zero_()
            for i, member in enumerate(members):
                for slot, theirs in zip(self._slots(), self._slots(member), strict=True):
                    block = seed_block(slot.trainable(), i, self.size, slot.rows, slot.cols)
                    block.copy_(theirs.tensor().view_as(block))

    @torch.no_grad()
    def member(self, index: int) -> RecurrentModel:
        """Seed ``index`` as an ordinary model of hidden size ``H`` (a copy, in eval mode)."""
        model = RecurrentModel(self.member_config)
        for slot, mine in zip(self._slots(), self._slots(model), strict=True):
            block = seed_block(slot.tensor(), index, self.size, slot.rows, slot.cols)
            mine.tensor().copy_(block.reshape(mine.tensor().shape))
        return model.eval()

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, S, n)`` -> the head's output ``(B, T, S, o)`` (logits for a classifier).

        Every step of every row is computed: rows shorter than ``T`` run on through their
        padding, so score only their valid steps. No per-step masking keeps the loop short: at
        these sizes a step costs per operation, not per multiply.
        """
        b, t, s, n = x.shape
        if s != self.size or n != self.member_config.input_size:
            raise ValueError(
                f"SeedEnsemble: x must be (B, T, {self.size}, {self.member_config.input_size}), "
                f"got {tuple(x.shape)}"
            )
        model = self.wide
        cell = model.layers()[0]
        with parametrize.cached():  # mask each weight once per call, not once per step
            seq = (x.reshape(b, t, s * n) - model.input_mean) / model.input_std  # (B, T, S*n)
            xp = cell.project_input(seq)  # (B, T, k*S*H), hoisted out of the loop
            state = cell.initial_state(b, x.device)
            outputs = []
            for step in range(t):
                state = cell.recur(xp[:, step], state)
                outputs.append(state[0])
            out: Tensor = model.head(torch.stack(outputs, dim=1))  # (B, T, S*o)
        return out.view(b, t, s, self.member_config.output_size)

    def _seed_grads(self) -> list[Tensor]:
        """Each parameter's gradient as ``(k, S, rows, ...)``: seed on the second axis.

        Entries outside a seed's blocks are zero (masked), so grouping by the row's seed is exact.
        """
        grads = []
        for slot in self._slots():
            grad = slot.trainable().grad
            if grad is not None:
                grads.append(grad.view(-1, self.size, slot.rows, *grad.shape[1:]))
        return grads

    def grad_norms(self) -> Tensor:
        """``(S,)`` the 2-norm of each seed's gradient over all its parameters."""
        squares = torch.zeros(self.size)
        for g in self._seed_grads():
            squares += g.pow(2).transpose(0, 1).reshape(self.size, -1).sum(dim=1)
        return squares.sqrt()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale each seed's gradient to a norm of at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does for a model trained alone; return the norms."""
        norms = self.grad_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (S,)
        for g in self._seed_grads():
            g.mul_(scale.view(1, -1, *[1] * (g.dim() - 2)))
        return norms
