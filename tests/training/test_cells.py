"""The cells against closed forms and independent references (torch.nn, the ONNX GRU op)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from training.cells import CELLS, make_cell

# Closed forms from REFERENCE.md (Dey & Salem 2017, Heck & Salem 2017, PyTorch), n inputs, m units.
PARAMETER_FORMULAS = {
    "gru": lambda n, m: 3 * (n * m + m * m + 2 * m),
    "gru-classic": lambda n, m: 3 * (n * m + m * m + m),
    "gru1": lambda n, m: n * m + 3 * m * m + 3 * m,
    "gru2": lambda n, m: n * m + 3 * m * m + m,
    "gru3": lambda n, m: n * m + m * m + 3 * m,
    "mgu": lambda n, m: 2 * (n * m + m * m + m),
    "mgu1": lambda n, m: n * m + 2 * m * m + 2 * m,
    "mgu2": lambda n, m: n * m + 2 * m * m + m,
    "mgu3": lambda n, m: n * m + m * m + 2 * m,
    "lstm": lambda n, m: 4 * (n * m + m * m + 2 * m),
}


def test_every_cell_has_a_formula() -> None:
    assert set(PARAMETER_FORMULAS) == set(CELLS)


@pytest.mark.parametrize("kind", list(PARAMETER_FORMULAS))
@pytest.mark.parametrize(("n", "m"), [(1, 1), (5, 7), (16, 3)])
def test_parameter_count_matches_closed_form(kind: str, n: int, m: int) -> None:
    cell = make_cell(kind, n, m)
    assert sum(p.numel() for p in cell.parameters()) == PARAMETER_FORMULAS[kind](n, m)


def _copy_into_torch_rnn(model, rnn: torch.nn.RNNBase) -> None:
    with torch.no_grad():
        for k, cell in enumerate(model.cells):
            getattr(rnn, f"weight_ih_l{k}").copy_(cell.weight_ih)
            getattr(rnn, f"weight_hh_l{k}").copy_(cell.weight_hh)
            getattr(rnn, f"bias_ih_l{k}").copy_(cell.bias_ih)
            getattr(rnn, f"bias_hh_l{k}").copy_(cell.bias_hh)


@pytest.mark.parametrize(
    ("kind", "torch_class"),
    [pytest.param("gru", torch.nn.GRU, id="gru"), pytest.param("lstm", torch.nn.LSTM, id="lstm")],
)
def test_matches_torch_nn(make_model, kind: str, torch_class: type[torch.nn.RNNBase]) -> None:
    model = make_model(kind, input_size=4, hidden_size=16, num_layers=2, stats=False)
    rnn = torch_class(4, 16, num_layers=2, batch_first=True)
    _copy_into_torch_rnn(model, rnn)
    x = torch.randn(5, 9, 4)
    state = tuple(torch.randn(2, 5, 16) for _ in range(model.config.num_states))
    with torch.no_grad():
        y, final = model(x, state=state)
        seq, ref_final = rnn(x, state if kind == "lstm" else state[0])
        ref_y = model.head(seq)  # same head on torch's hidden sequence
    ref_final = ref_final if kind == "lstm" else (ref_final,)
    torch.testing.assert_close(y, ref_y, atol=1e-6, rtol=0)
    for ours, theirs in zip(final, ref_final, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_gru_cell_matches_torch_gru_cell() -> None:
    cell = make_cell("gru", 3, 5)
    ref = torch.nn.GRUCell(3, 5)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, name).copy_(getattr(cell, name))
        x, h = torch.randn(4, 3), torch.randn(4, 5)
        torch.testing.assert_close(cell(x, h), ref(x, h), atol=1e-6, rtol=0)
        torch.testing.assert_close(cell(x), ref(x), atol=1e-6, rtol=0)  # hx=None is zeros


def _onnx_gru_reset_before(cell, steps: int, batch: int) -> ort.InferenceSession:
    """A one-op graph: ONNX GRU with linear_before_reset=0, weights copied from ``cell``."""
    m, n = cell.hidden_size, cell.input_size
    zrh = [1, 0, 2]  # our (r, z, n) blocks in ONNX's (z, r, h) order
    w = cell.weight_ih.detach().numpy().reshape(3, m, n)[zrh].reshape(1, 3 * m, n)
    r = cell.weight_hh.detach().numpy().reshape(3, m, m)[zrh].reshape(1, 3 * m, m)
    b_w = cell.bias_ih.detach().numpy().reshape(3, m)[zrh].reshape(-1)
    b = np.concatenate([b_w, np.zeros(3 * m, np.float32)])[None]
    inits = [
        helper.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel().tolist())
        for name, a in (("W", w), ("R", r), ("B", b))
    ]
    node = helper.make_node(
        "GRU", ["X", "W", "R", "B", "", "H0"], ["Y", "Y_h"], hidden_size=m, linear_before_reset=0
    )
    float_info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [node],
        "gru_reference",
        [
            float_info("X", TensorProto.FLOAT, [steps, batch, n]),
            float_info("H0", TensorProto.FLOAT, [1, batch, m]),
        ],
        [float_info("Y", TensorProto.FLOAT, [steps, 1, batch, m])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_gru_classic_matches_onnx_gru_op_with_reset_before() -> None:
    torch.manual_seed(1)
    cell = make_cell("gru-classic", 4, 6)
    steps, batch = 8, 3
    x, h = torch.randn(steps, batch, 4), torch.randn(batch, 6)
    session = _onnx_gru_reset_before(cell, steps, batch)
    (expected,) = session.run(None, {"X": x.numpy(), "H0": h[None].numpy()})
    with torch.no_grad():
        for t in range(steps):
            h = cell(x[t], h)
            np.testing.assert_allclose(h.numpy(), expected[t, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_errors_start_with_class_name(kind: str) -> None:
    cls = CELLS[kind]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: hidden_size must be >= 1"):
        cls(3, 0)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: input_size must be >= 1"):
        cls(0, 3)
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: input must be \(batch, 3\)"):
        cls(3, 4)(torch.zeros(2, 5))


@pytest.mark.parametrize("kind", ["gru", "mgu2", "lstm"])
def test_lengths_keep_each_rows_state_at_its_length(make_model, kind: str) -> None:
    model = make_model(kind, num_layers=2)
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 2, 4])
    with torch.no_grad():
        y, final = model(x, lengths)
        for row, length in enumerate(lengths.tolist()):
            y_row, final_row = model(x[row : row + 1, :length])  # the row alone, unpadded
            torch.testing.assert_close(y[row, :length], y_row[0], atol=1e-6, rtol=0)
            assert torch.all(y[row, length:] == 0)
            for ours, alone in zip(final, final_row, strict=True):
                torch.testing.assert_close(ours[:, row], alone[:, 0], atol=1e-6, rtol=0)
