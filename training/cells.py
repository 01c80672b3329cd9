"""Recurrent cells: the fully gated GRU (two forms), its gate variants, the MGU family, the LSTM.

Every cell follows one interface so that :class:`training.model.RecurrentModel` can stack any of
them and :mod:`training.onnx_graph` can export any of them:

- ``project_input(x)`` computes, for all time steps at once, the part of each step that depends
  on the input alone (the input projection and the biases that sit beside it). Training and the
  exported graph both hoist it out of the time loop into one matrix product.
- ``recur(xp, state)`` advances the state by one step from that projection.
- ``forward(input, hx=None)`` is one step from a raw input, the way ``torch.nn.GRUCell`` works.

Conventions. ``n`` is the input size and ``m`` the hidden size. Gate blocks are stacked in one
matrix in the order given by each class (``weight_ih`` is ``(k * m, n)``, ``weight_hh`` is
``(j * m, m)``). The GRU family lets the update gate keep the old state,
``h' = (1 - z) * n + z * h``, as PyTorch and ONNX do (the paper writes ``(1 - z) * h + z * n``:
the same family with ``z`` relabelled ``1 - z``).
The MGU family keeps the papers' form ``h' = (1 - f) * h + f * n``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


class RecurrentCell(nn.Module):
    """Base class of every cell. Subclasses set ``kind``, the gate blocks and the step."""

    kind: ClassVar[str]
    #: number of state tensors (1 for the GRU and MGU families, 2 for the LSTM: h and c)
    num_states: ClassVar[int] = 1
    #: how many m-sized blocks the input projection, the hidden projection and the biases have
    input_blocks: ClassVar[int]
    hidden_blocks: ClassVar[int]
    bias_blocks: ClassVar[int]
    #: True where the cell has a second bias beside the hidden projection (reset-after GRU, LSTM)
    hidden_bias: ClassVar[bool] = False

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        name = type(self).__name__
        if input_size < 1:
            raise ValueError(f"{name}: input_size must be >= 1, got {input_size}")
        if hidden_size < 1:
            raise ValueError(f"{name}: hidden_size must be >= 1, got {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        m = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(self.input_blocks * m, input_size))
        self.weight_hh = nn.Parameter(torch.empty(self.hidden_blocks * m, m))
        self.bias_ih = nn.Parameter(torch.empty(self.bias_blocks * m))
        self.bias_hh = nn.Parameter(torch.empty(self.bias_blocks * m)) if self.hidden_bias else None
        self.reset_parameters()

    @classmethod
    def parameter_count(cls, input_size: int, hidden_size: int) -> int:
        """Closed-form number of parameters, as given in the class docstring."""
        n, m = input_size, hidden_size
        biases = cls.bias_blocks * m * (2 if cls.hidden_bias else 1)
        return cls.input_blocks * m * n + cls.hidden_blocks * m * m + biases

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(m), 1/sqrt(m)), as PyTorch initialises its recurrent layers."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def initial_state(self, batch: int, device: torch.device | None = None) -> State:
        zeros = torch.zeros(batch, self.hidden_size, device=device)
        return tuple(zeros.clone() for _ in range(self.num_states))

    def project_input(self, x: Tensor) -> Tensor:
        """``W x + b`` for every step at once: ``(..., n) -> (..., input_blocks * m)``."""
        return x @ self.weight_ih.T + self.input_bias()

    def input_bias(self) -> Tensor:
        """The bias added to the input projection; cells with bias-only gates override it."""
        return self.bias_ih

    def recur(self, xp: Tensor, state: State) -> State:
        raise NotImplementedError

    def forward(self, input: Tensor, hx: Tensor | State | None = None) -> Tensor | State:
        """One step: ``input`` (B, n), ``hx`` (B, m) (LSTM: a pair) or None for zeros."""
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: input must be (batch, {self.input_size}), "
                f"got {tuple(input.shape)}"
            )
        if hx is None:
            state = self.initial_state(input.shape[0], input.device)
        else:
            state = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        new = self.recur(self.project_input(input), state)
        return new[0] if self.num_states == 1 else new

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def _split(t: Tensor, m: int) -> tuple[Tensor, ...]:
    return tuple(torch.split(t, m, dim=-1))


class GRU(RecurrentCell):
    r"""Fully gated GRU in the reset-after form of PyTorch ``nn.GRU``, cuDNN and ONNX
    ``GRU(linear_before_reset=1)``. Gate order (r, z, n).

    .. math::
        r &= \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z &= \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n &= \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})) \\
        h' &= (1 - z) \odot n + z \odot h

    Parameters: ``3 (n m + m^2 + 2 m)``.

    Args: input_size (n), hidden_size (m).
    Inputs: input ``(B, n)``, hx ``(B, m)`` or None for zeros. Outputs: h' ``(B, m)``.
    """

    kind = "gru"
    input_blocks, hidden_blocks, bias_blocks, hidden_bias = 3, 3, 3, True

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        assert self.bias_hh is not None
        hp = h @ self.weight_hh.T + self.bias_hh  # (B, 3m)
        x_r, x_z, x_n = _split(xp, m)
        h_r, h_z, h_n = _split(hp, m)
        r = torch.sigmoid(x_r + h_r)  # (B, m)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)


class GRUClassic(RecurrentCell):
    r"""Fully gated GRU in the reset-before form of Cho et al. 2014 and ONNX
    ``GRU(linear_before_reset=0)``: the reset gate scales the state before its projection.
    Gate order (r, z, n), one bias per gate.

    .. math::
        r &= \sigma(W_r x + U_r h + b_r) \\
        z &= \sigma(W_z x + U_z h + b_z) \\
        n &= \tanh(W_n x + U_n (r \odot h) + b_n) \\
        h' &= (1 - z) \odot n + z \odot h

    Parameters: ``3 (n m + m^2 + m)``.
    """

    kind = "gru-classic"
    input_blocks, hidden_blocks, bias_blocks = 3, 3, 3

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        x_r, x_z, x_n = _split(xp, m)
        gates = h @ self.weight_hh[: 2 * m].T  # (B, 2m)
        r = torch.sigmoid(x_r + gates[:, :m])
        z = torch.sigmoid(x_z + gates[:, m:])
        n = torch.tanh(x_n + (r * h) @ self.weight_hh[2 * m :].T)
        return ((1 - z) * n + z * h,)


class _StateGatedGRU(RecurrentCell):
    """GRU whose gates see no input (Dey & Salem 2017 types 1 and 2); candidate as in Cho et al.

    ``weight_ih`` is the candidate's ``W_n`` only; ``weight_hh`` stacks (U_r, U_z, U_n).
    """

    input_blocks, hidden_blocks = 1, 3

    def gate_bias(self) -> Tensor | float:
        raise NotImplementedError

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        gates = torch.sigmoid(h @ self.weight_hh[: 2 * m].T + self.gate_bias())  # (B, 2m)
        r, z = gates[:, :m], gates[:, m:]
        n = torch.tanh(xp + (r * h) @ self.weight_hh[2 * m :].T)  # (B, m)
        return ((1 - z) * n + z * h,)


class GRU1(_StateGatedGRU):
    r"""GRU gate variant type 1 (Dey & Salem 2017): gates from the state and a bias.

    .. math::
        r = \sigma(U_r h + b_r),\quad z = \sigma(U_z h + b_z),\quad
        n = \tanh(W_n x + U_n (r \odot h) + b_n),\quad h' = (1 - z) \odot n + z \odot h

    Parameters: ``n m + 3 m^2 + 3 m``. ``bias_ih`` stacks (b_r, b_z, b_n).
    """

    kind = "gru1"
    bias_blocks = 3

    def input_bias(self) -> Tensor:
        return self.bias_ih[2 * self.hidden_size :]

    def gate_bias(self) -> Tensor:
        return self.bias_ih[: 2 * self.hidden_size]


class GRU2(_StateGatedGRU):
    r"""GRU gate variant type 2 (Dey & Salem 2017): gates from the state alone, no bias.

    .. math::
        r = \sigma(U_r h),\quad z = \sigma(U_z h),\quad
        n = \tanh(W_n x + U_n (r \odot h) + b_n),\quad h' = (1 - z) \odot n + z \odot h

    Parameters: ``n m + 3 m^2 + m``. ``bias_ih`` is b_n.
    """

    kind = "gru2"
    bias_blocks = 1

    def gate_bias(self) -> float:
        return 0.0


class GRU3(RecurrentCell):
    r"""GRU gate variant type 3 (Dey & Salem 2017): gates from a bias alone (constant per unit).

    .. math::
        r = \sigma(b_r),\quad z = \sigma(b_z),\quad
        n = \tanh(W_n x + U_n (r \odot h) + b_n),\quad h' = (1 - z) \odot n + z \odot h

    Parameters: ``n m + m^2 + 3 m``. ``bias_ih`` stacks (b_r, b_z, b_n); ``weight_hh`` is U_n.
    """

    kind = "gru3"
    input_blocks, hidden_blocks, bias_blocks = 1, 1, 3

    def input_bias(self) -> Tensor:
        return self.bias_ih[2 * self.hidden_size :]

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        r = torch.sigmoid(self.bias_ih[:m])  # (m,)
        z = torch.sigmoid(self.bias_ih[m : 2 * m])
        n = torch.tanh(xp + (r * h) @ self.weight_hh.T)  # (B, m)
        return ((1 - z) * n + z * h,)


class MGU(RecurrentCell):
    r"""Minimal gated unit (Zhou, Wu, Zhang & Zhou 2016): one forget gate that both resets and
    updates. Block order (f, n).

    .. math::
        f &= \sigma(W_f x + U_f h + b_f) \\
        n &= \tanh(W_n x + U_n (f \odot h) + b_n) \\
        h' &= (1 - f) \odot h + f \odot n

    Parameters: ``2 (n m + m^2 + m)``.
    """

    kind = "mgu"
    input_blocks, hidden_blocks, bias_blocks = 2, 2, 2

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        x_f, x_n = _split(xp, m)
        f = torch.sigmoid(x_f + h @ self.weight_hh[:m].T)  # (B, m)
        n = torch.tanh(x_n + (f * h) @ self.weight_hh[m:].T)
        return ((1 - f) * h + f * n,)


class _StateGatedMGU(RecurrentCell):
    """MGU whose forget gate sees no input (Heck & Salem 2017 MGU1 and MGU2).

    ``weight_ih`` is the candidate's ``W_n``; ``weight_hh`` stacks (U_f, U_n).
    """

    input_blocks, hidden_blocks = 1, 2

    def gate_bias(self) -> Tensor | float:
        raise NotImplementedError

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        m = self.hidden_size
        f = torch.sigmoid(h @ self.weight_hh[:m].T + self.gate_bias())  # (B, m)
        n = torch.tanh(xp + (f * h) @ self.weight_hh[m:].T)
        return ((1 - f) * h + f * n,)


class MGU1(_StateGatedMGU):
    r"""MGU variant 1 (Heck & Salem 2017): forget gate from the state and a bias.

    .. math::
        f = \sigma(U_f h + b_f),\quad n = \tanh(W_n x + U_n (f \odot h) + b_n),\quad
        h' = (1 - f) \odot h + f \odot n

    Parameters: ``n m + 2 m^2 + 2 m``. ``bias_ih`` stacks (b_f, b_n).
    """

    kind = "mgu1"
    bias_blocks = 2

    def input_bias(self) -> Tensor:
        return self.bias_ih[self.hidden_size :]

    def gate_bias(self) -> Tensor:
        return self.bias_ih[: self.hidden_size]


class MGU2(_StateGatedMGU):
    r"""MGU variant 2 (Heck & Salem 2017): forget gate from the state alone.

    .. math::
        f = \sigma(U_f h),\quad n = \tanh(W_n x + U_n (f \odot h) + b_n),\quad
        h' = (1 - f) \odot h + f \odot n

    Parameters: ``n m + 2 m^2 + m``. ``bias_ih`` is b_n.
    """

    kind = "mgu2"
    bias_blocks = 1

    def gate_bias(self) -> float:
        return 0.0


class MGU3(RecurrentCell):
    r"""MGU variant 3 (Heck & Salem 2017): forget gate from a bias alone.

    .. math::
        f = \sigma(b_f),\quad n = \tanh(W_n x + U_n (f \odot h) + b_n),\quad
        h' = (1 - f) \odot h + f \odot n

    Parameters: ``n m + m^2 + 2 m``. ``bias_ih`` stacks (b_f, b_n); ``weight_hh`` is U_n.
    """

    kind = "mgu3"
    input_blocks, hidden_blocks, bias_blocks = 1, 1, 2

    def input_bias(self) -> Tensor:
        return self.bias_ih[self.hidden_size :]

    def recur(self, xp: Tensor, state: State) -> State:
        (h,) = state
        f = torch.sigmoid(self.bias_ih[: self.hidden_size])  # (m,)
        n = torch.tanh(xp + (f * h) @ self.weight_hh.T)  # (B, m)
        return ((1 - f) * h + f * n,)


class LSTM(RecurrentCell):
    r"""Long short-term memory, as PyTorch ``nn.LSTM``. Gate order (i, f, g, o), two biases.

    .. math::
        i &= \sigma(W_i x + b_{ii} + U_i h + b_{hi}) \\
        f &= \sigma(W_f x + b_{if} + U_f h + b_{hf}) \\
        g &= \tanh(W_g x + b_{ig} + U_g h + b_{hg}) \\
        o &= \sigma(W_o x + b_{io} + U_o h + b_{ho}) \\
        c' &= f \odot c + i \odot g,\quad h' = o \odot \tanh(c')

    Parameters: ``4 (n m + m^2 + 2 m)``. State: (h, c).
    """

    kind = "lstm"
    num_states = 2
    input_blocks, hidden_blocks, bias_blocks, hidden_bias = 4, 4, 4, True

    def recur(self, xp: Tensor, state: State) -> State:
        h, c = state
        assert self.bias_hh is not None
        gates = xp + h @ self.weight_hh.T + self.bias_hh  # (B, 4m)
        i, f, g, o = _split(gates, self.hidden_size)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new


CELLS: dict[str, type[RecurrentCell]] = {
    cls.kind: cls for cls in (GRU, GRUClassic, GRU1, GRU2, GRU3, MGU, MGU1, MGU2, MGU3, LSTM)
}


def make_cell(kind: str, input_size: int, hidden_size: int) -> RecurrentCell:
    """Build a cell by its contract name (``gru``, ``gru-classic``, ..., ``lstm``)."""
    try:
        cls = CELLS[kind]
    except KeyError:
        raise ValueError(f"unknown cell {kind!r}; choose one of {', '.join(CELLS)}") from None
    return cls(input_size, hidden_size)
