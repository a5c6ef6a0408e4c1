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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import InputError
from dgconvert.runtime.base import StageOutput
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


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
        # its run_stage binds the plain stage sessions: no fused or composed graphs to build
        super().__init__(bundle, providers=providers, threads=threads, spinning=spinning,
                         fuse_boundaries=False, compose=False)
        self.device_id = int(device_id)
        self.device_type = device_type

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        sess, names = self._sessions[k], self._inputs[k]
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
        wanted = self._wanted[k]
        for out in wanted:
            if out == "features":
                io.bind_output(out, self.device_type, self.device_id)
            else:
                io.bind_output(out, "cpu")
        sess.run_with_iobinding(io)
        values = dict(zip(wanted, io.get_outputs(), strict=True))
        score = np.asarray(values["score"].numpy(), dtype=np.float32)
        label = np.asarray(values["label"].numpy(), dtype=np.int64)
        feats = OrtFeatures(values["features"], k) if "features" in values else None
        return StageOutput(feats, score, label)

    def describe(self) -> str:
        return super().describe().replace("onnxruntime (", "onnxruntime-gpu (I/O binding on "
                                          f"{self.device_type}:{self.device_id}; ", 1)
