"""ONNX Runtime session options: the thread count that ``intra_op_threads`` maps to."""

from __future__ import annotations

import pytest

from service.engine.runtime import session_options

SPINNING = "session.intra_op.allow_spinning"


@pytest.mark.parametrize(
    ("threads", "on_cpu", "expected"),
    [
        pytest.param(0, True, 1, id="default-on-cpu-is-one-thread"),
        pytest.param(0, False, 0, id="default-elsewhere-is-onnxruntime-default"),
        pytest.param(3, True, 3, id="explicit-on-cpu"),
        pytest.param(2, False, 2, id="explicit-elsewhere"),
    ],
)
def test_intra_op_threads(threads: int, on_cpu: bool, expected: int) -> None:
    assert session_options(threads, on_cpu=on_cpu).intra_op_num_threads == expected


def test_idle_threads_do_not_spin() -> None:
    assert session_options(4, on_cpu=True).get_session_config_entry(SPINNING) == "0"
