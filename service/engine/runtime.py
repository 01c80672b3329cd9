"""One ONNX Runtime session per model version, and the one call the batcher makes on it.

Which providers to ask for is decided here, once per process (``resolve_providers``). CUDA is
asked for only where it can run: ONNX Runtime asked for CUDA on a machine without an NVIDIA
driver prints red error lines on stderr and then runs on the CPU anyway. Where a GPU is present
the CUDA 13 and cuDNN 9 libraries of the nvidia-* wheels (onnxruntime-gpu's ``[cuda,cudnn]``
extras) are made loadable first with ``onnxruntime.preload_dlls``; without it the CUDA provider
fails with ``libcublasLt.so.13: cannot open shared object file`` and falls back to the CPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.engine.registry import ModelLoadError, ModelSpec

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
NVIDIA = (CUDA, "TensorrtExecutionProvider")  # providers that need an NVIDIA driver and GPU
ProviderList = list[str | tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class CudaStatus:
    """Whether CUDA can be asked for on this machine, and if not, why (one line)."""

    usable: bool
    reason: str = ""


def _load_driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _count_devices(driver: ctypes.CDLL) -> tuple[int, int]:
    """(cuInit's result, the number of CUDA devices) from the driver API."""
    status = int(driver.cuInit(0))
    if status != 0:
        return status, 0
    count = ctypes.c_int(0)
    status = int(driver.cuDeviceGetCount(ctypes.byref(count)))
    return status, count.value


def probe_cuda(
    available: Callable[[], list[str]] = ort.get_available_providers,
    load_driver: Callable[[], ctypes.CDLL] = _load_driver,
    count_devices: Callable[[ctypes.CDLL], tuple[int, int]] = _count_devices,
) -> CudaStatus:
    """Check, without asking ONNX Runtime for CUDA, that its CUDA provider could run here."""
    if CUDA not in available():
        return CudaStatus(False, f"onnxruntime {ort.__version__} has no CUDA provider (CPU build)")
    try:
        driver = load_driver()
    except OSError as exc:
        return CudaStatus(False, f"no NVIDIA driver (libcuda.so.1 cannot be loaded: {exc})")
    try:
        status, devices = count_devices(driver)
    except (AttributeError, OSError) as exc:
        return CudaStatus(False, f"the NVIDIA driver does not answer ({exc})")
    if status != 0:
        return CudaStatus(False, f"no usable CUDA device (cuInit returned CUDA error {status})")
    if devices < 1:
        return CudaStatus(False, "the NVIDIA driver sees no GPU")
    return CudaStatus(True)


def preload_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries of the nvidia-* wheels loadable, where that exists.

    ``preload_dlls`` came with onnxruntime 1.21 and is missing from the CPU package; without
    the nvidia-* wheels it finds nothing and CUDA must come from the system's library path.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except OSError as exc:  # a library that is there but does not load: say so, go on
        logger.warning("onnxruntime.preload_dlls failed: %s", exc)


@functools.cache
def cuda_status() -> CudaStatus:
    """Probe CUDA once per process; preload its libraries, or log why the CPU is used."""
    status = probe_cuda()
    if status.usable:
        preload_cuda_libraries()
    else:
        logger.info("CUDA provider not used, running on the CPU provider: %s", status.reason)
    return status


def resolve_providers(
    wanted: list[str], status: Callable[[], CudaStatus] = cuda_status
) -> list[str]:
    """The providers to ask ONNX Runtime for: those wanted that are installed and can run.

    NVIDIA providers are dropped (and the reason logged once) when no driver or GPU is there.
    """
    if any(p in NVIDIA for p in wanted) and not status().usable:
        wanted = [p for p in wanted if p not in NVIDIA]
    available = set(ort.get_available_providers())
    return [p for p in wanted if p in available] or [CPU]


def cuda_options(cuda_tf32: bool = False) -> dict[str, str]:
    """The CUDA provider's options: TF32 matmuls only if ``cuda_tf32`` (ONNX Runtime's default
    is on, which moves float32 results by about 1e-3 relative to the CPU provider)."""
    return {"use_tf32": "1" if cuda_tf32 else "0"}


def provider_list(providers: list[str], cuda_tf32: bool = False) -> ProviderList:
    """``providers`` with the CUDA provider's options."""
    return [(p, cuda_options(cuda_tf32)) if p == CUDA else p for p in providers]


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

    def __init__(
        self,
        spec: ModelSpec,
        providers: list[str],
        intra_op_threads: int = 0,
        *,
        cuda_tf32: bool = False,
    ) -> None:
        self.metadata = spec.metadata
        self.onnx_path = spec.onnx_path
        wanted = resolve_providers(providers)
        options = session_options(intra_op_threads, on_cpu=wanted[0] == CPU)
        options.log_severity_level = 3  # the provider fallback is reported by us, below
        self._session = ort.InferenceSession(
            str(spec.onnx_path), options, providers=provider_list(wanted, cuda_tf32)
        )
        # onnxruntime-gpu silently falls back to CPU when CUDA cannot start: report what runs.
        self.providers: list[str] = self._session.get_providers()
        if self.providers[0] != wanted[0]:
            logger.warning(
                "model %s/%s: asked for %s, running on %s",
                self.metadata.name,
                self.metadata.version,
                wanted[0],
                self.providers[0],
            )

    @property
    def provider(self) -> str:
        """The execution provider that runs this model's nodes first (the one in use)."""
        return self.providers[0]

    def probe(self) -> None:
        """Run the model once (2 rows of 2 and 1 steps from zero states) and check what comes
        out against metadata.json; raise ``ModelLoadError`` naming the first difference.

        The registry checks the graph's declared shapes, but a graph may leave sizes symbolic:
        only running it shows, say, a hidden size other than the one the metadata claims, which
        would otherwise fail every request (and size the state pool wrongly).
        """
        meta = self.metadata
        x = np.full((2, 2, meta.input_size), 0.5, np.float32)  # (B, T, n)
        state = (meta.num_states, meta.num_layers, 2, meta.hidden_size)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # the failure is reported by us, as the refusal's reason
        try:
            out = self.run(x, np.array([2, 1], np.int64), np.zeros(state, np.float32), quiet)
        except Exception as exc:  # ONNX Runtime raises several types for a graph that fails
            raise ModelLoadError(f"the model fails a probe run (batch 2, 2 steps): {exc}") from None
        _expect(out.y.shape, (2, 2, meta.output_size), "y", "[batch, time, output_size]")
        _expect(out.states.shape, state, "the state outputs", "[states, layers, batch, hidden]")
        if not (np.isfinite(out.y).all() and np.isfinite(out.states).all()):
            raise ModelLoadError("the model's probe run (zero states, inputs 0.5) is not finite")
        if np.any(out.y[1, 1] != 0):
            raise ModelLoadError("y is not 0 past a row's length, as the model format requires")

    def run(
        self,
        x: FloatArray,
        lengths: IntArray,
        states: FloatArray,
        options: ort.RunOptions | None = None,
    ) -> RunOutput:
        """Run ``x`` (B, T, n) from ``states`` (S, L, B, m) for ``lengths`` (B,) valid steps."""
        meta = self.metadata
        feeds: dict[str, npt.NDArray[np.generic]] = {"x": x, "lengths": lengths}
        for k, name in enumerate(meta.state_inputs):
            feeds[name] = states[k]  # (L, B, m)
        names = ["y", *meta.state_outputs]
        y, *new_states = self._session.run(names, feeds, options)
        # One state tensor (GRU, MGU) needs no copy to gain its leading axis.
        stacked = new_states[0][None] if len(new_states) == 1 else np.stack(new_states)
        return RunOutput(y=y, states=stacked)  # (S, L, B, m)


def _expect(found: tuple[int, ...], wanted: tuple[int, ...], what: str, axes: str) -> None:
    if tuple(found) != wanted:
        raise ModelLoadError(
            f"the probe run's {what} have shape {list(found)}, metadata.json implies "
            f"{list(wanted)} ({axes})"
        )
