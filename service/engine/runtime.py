"""One ONNX Runtime session per model version, and the one call the batcher makes on it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.engine.registry import ModelSpec

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
CPU = "CPUExecutionProvider"


def session_options(intra_op_threads: int, on_cpu: bool) -> ort.SessionOptions:
    """ONNX Runtime options for a model's calls.

    ``intra_op_threads`` 0 means one thread when the model runs on the CPU provider (batches of
    small recurrent models gain little from more, and spare cores serve the event loop) and ONNX
    Runtime's default (one per core) otherwise. Idle intra-op threads never spin: spinning threads
    would take the cores the event loop needs between calls.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if intra_op_threads == 0 and on_cpu else intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass(frozen=True)
class RunOutput:
    """Outputs of one call: ``y`` (B, T, o) and the states (S, L, B, m) at each row's length."""

    y: FloatArray
    states: FloatArray


class ModelRuntime:
    """An ``InferenceSession`` for one model version.

    ``run`` is thread-safe (ONNX Runtime's ``run`` may be called concurrently) and blocking: call it
    from a worker thread, never on the event loop.
    """

    def __init__(self, spec: ModelSpec, providers: list[str], intra_op_threads: int = 0) -> None:
        self.metadata = spec.metadata
        self.onnx_path = spec.onnx_path
        available = set(ort.get_available_providers())
        wanted = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        options = session_options(intra_op_threads, on_cpu=wanted[0] == CPU)
        options.log_severity_level = 3  # the provider fallback is reported by us, below
        self._session = ort.InferenceSession(str(spec.onnx_path), options, providers=wanted)
        # onnxruntime-gpu silently falls back to CPU when CUDA cannot start: report what runs.
        self.providers: list[str] = self._session.get_providers()
        if self.providers[0] != providers[0]:
            logger.warning(
                "model %s/%s: asked for %s, running on %s",
                self.metadata.name,
                self.metadata.version,
                providers[0],
                self.providers[0],
            )

    @property
    def provider(self) -> str:
        """The execution provider that runs this model's nodes first (the one in use)."""
        return self.providers[0]

    def run(self, x: FloatArray, lengths: IntArray, states: FloatArray) -> RunOutput:
        """Run ``x`` (B, T, n) from ``states`` (S, L, B, m) for ``lengths`` (B,) valid steps."""
        meta = self.metadata
        feeds: dict[str, npt.NDArray[np.generic]] = {"x": x, "lengths": lengths}
        for k, name in enumerate(meta.state_inputs):
            feeds[name] = states[k]  # (L, B, m)
        names = ["y", *meta.state_outputs]
        y, *new_states = self._session.run(names, feeds)
        # One state tensor (GRU, MGU) needs no copy to gain its leading axis.
        stacked = new_states[0][None] if len(new_states) == 1 else np.stack(new_states)
        return RunOutput(y=y, states=stacked)  # (S, L, B, m)
