"""onnxruntime-gpu backend: CUDA (or TensorRT) execution providers with I/O binding.

Plain ``InferenceSession.run`` copies every output to the host and every input back, so a
GPU chain would ship the features through the CPU between stages. With I/O binding
(https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html,
https://onnxruntime.ai/docs/api/python/api_summary.html#iobinding) each stage's ``features``
output is bound to the device (``bind_output(name, "cuda", device_id)``) and handed to the
next stage as the same ``OrtValue`` (``bind_ortvalue_input``); only ``score``/``label`` are
bound to the CPU, and ``keep`` (and stage 0's images) are bound from host arrays
(``bind_cpu_input``). Each call uses its own ``IOBinding``, so threads can share a backend.

``device_type="cpu"`` with ``providers=["CPUExecutionProvider"]`` runs the same code path on
the CPU (used by the tests where no GPU exists).

Loading. ``onnxruntime.get_available_providers()`` lists the providers the package was
*built* with: it lists CUDA even when the CUDA/cuDNN libraries fail to load, and the session
then silently runs on the CPU. So the backend calls ``onnxruntime.preload_dlls()`` (ORT >=
1.21: loads CUDA/cuDNN from the ``nvidia-*`` pip packages,
https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#preload-dlls)
before the first GPU session, and raises :class:`BackendUnavailableError` unless every
session's first provider (``InferenceSession.get_providers()[0]``) is the one asked for, so
``backend="auto"`` falls back with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BackendUnavailableError, InputError
from dgconvert.runtime.base import StageOutput
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.thread_pool import new_session_options, probe_model

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
FIX = ("Fix: install the onnxruntime-gpu build for your driver's CUDA major, alone "
       "(pip uninstall -y onnxruntime; pip install 'onnxruntime-gpu<1.27' on a CUDA 12 driver "
       "or 'onnxruntime-gpu>=1.27' on CUDA 13; docs/gpu.md, 'Install'), check "
       "`dgconvert doctor`, or use backend='onnxruntime'.")
log = logging.getLogger(__name__)
_preloaded: list[str] = []  # once per process


def preload_dlls() -> str:
    """Call ``onnxruntime.preload_dlls()`` once when this onnxruntime has it; say what happened."""
    if _preloaded:
        return _preloaded[0]
    import onnxruntime as ort

    fn = getattr(ort, "preload_dlls", None)
    if fn is None:
        what = f"onnxruntime {ort.__version__} has no preload_dlls (added in 1.21)"
    else:
        try:
            fn()
            what = "preload_dlls() called"
        except Exception as exc:  # a failed preload shows up as a session on the wrong provider
            what = f"preload_dlls() failed: {exc}"
    log.info("onnxruntime-gpu: %s", what)
    _preloaded.append(what)
    return what


def provider_name(p: str | tuple[str, dict[str, Any]]) -> str:
    return p if isinstance(p, str) else p[0]


def check_session_provider(session: Any, wanted: str, what: str) -> None:
    """Raise :class:`BackendUnavailableError` unless ``session`` runs on ``wanted`` first."""
    got = list(session.get_providers())
    if not got or got[0] != wanted:
        raise BackendUnavailableError(
            f"ONNX Runtime was asked for {wanted} for {what}, but the session runs on {got}: "
            f"{wanted} is listed by onnxruntime but did not load (its CUDA/cuDNN libraries are "
            f"missing or do not match the driver). {FIX}"
        )


def provider_loads(provider: str = "CUDAExecutionProvider", device_id: int = 0) -> str | None:
    """Create a one-node session on ``provider``: None when it loads, else why not.

    (``get_available_providers()`` alone lists providers whose libraries cannot load.)
    """
    import onnxruntime as ort

    if provider in GPU_PROVIDERS:
        preload_dlls()
    model = probe_model()
    so = new_session_options()
    so.log_severity_level = 3
    opts = {"device_id": device_id} if provider == "CUDAExecutionProvider" else {}
    try:
        fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(model, so,
                                    providers=[(provider, opts), *fallback])
        check_session_provider(sess, provider, "a one-node test graph")
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        return str(exc)
    return None


@dataclass
class OrtFeatures:
    """A stage's ``features`` kept where ONNX Runtime produced them (an ``OrtValue``)."""

    value: Any
    stage: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value.shape())

    def device(self) -> str:
        return str(self.value.device_name()).lower()

    def to_host(self) -> np.ndarray:
        """Copy to a host array (debugging and tests; the runner never does)."""
        return np.asarray(self.value.numpy())


class OnnxRuntimeGpuBackend(OnnxRuntimeBackend):
    """ONNX Runtime on a GPU with the features resident on the device between stages."""

    name = "onnxruntime-gpu"

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        spinning: bool = False,
        device_id: int = 0,
        device_type: str = "cuda",
    ) -> None:
        if providers is None:
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        wanted = provider_name(list(providers)[0])
        if wanted in GPU_PROVIDERS:
            preload_dlls()
        # its run_stage binds the plain stage sessions: no fused or composed graphs to build
        super().__init__(bundle, providers=providers, threads=threads, spinning=spinning,
                         fuse_boundaries=False, compose=False)
        for k, sess in enumerate(self.sessions):
            check_session_provider(sess, wanted, f"stage {k}")
        self.device_id = int(device_id)
        self.device_type = device_type

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        sess, io_spec = self.sessions[k], self.stage_io[k]
        names = io_spec.inputs
        io = sess.io_binding()
        if k == 0:
            io.bind_cpu_input(names[0], np.ascontiguousarray(inputs, dtype=np.float32))
        else:
            if not isinstance(inputs, OrtFeatures) or inputs.stage != k - 1:
                got = f"features of stage {inputs.stage}" if isinstance(inputs, OrtFeatures) else type(inputs).__name__
                raise InputError(
                    f"stage {k} got {got}; expected the OrtFeatures handle returned by stage "
                    f"{k - 1} of this backend."
                )
            io.bind_ortvalue_input(names[0], inputs.value)
            io.bind_cpu_input(names[1], np.ascontiguousarray(keep, dtype=np.int64))
        wanted = io_spec.fetched
        for out in wanted:
            if out == CONTRACT.features:
                io.bind_output(out, self.device_type, self.device_id)
            else:
                io.bind_output(out, "cpu")
        sess.run_with_iobinding(io)
        values = dict(zip(wanted, io.get_outputs(), strict=True))
        score = np.asarray(values[CONTRACT.score].numpy(), dtype=np.float32)
        label = np.asarray(values[CONTRACT.label].numpy(), dtype=np.int64)
        feats = OrtFeatures(values[CONTRACT.features], k) if CONTRACT.features in values else None
        return StageOutput(feats, score, label)

    def describe(self) -> str:
        return super().describe().replace("onnxruntime (", "onnxruntime-gpu (I/O binding on "
                                          f"{self.device_type}:{self.device_id}; ", 1)
