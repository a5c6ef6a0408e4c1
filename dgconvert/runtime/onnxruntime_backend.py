"""ONNX Runtime backend: one ``InferenceSession`` per stage.

Thread pools. Each session owns an intra-op thread pool. With the default spinning
workers, the idle pools of the stages that are not running keep spinning and steal the
cores from the stage that is: the staged chain measured 3x slower than the full model.
We therefore turn spinning off by default (``session.intra_op.allow_spinning = 0``,
``session.inter_op.allow_spinning = 0``) and run the graphs sequentially; pass
``spinning=True`` to restore ORT's default (good when only one session is busy at a time
on a machine with many idle cores).

Documented at https://onnxruntime.ai/docs/performance/tune-performance/threading.html
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgconvert.bundle import Bundle
from dgconvert.errors import BackendUnavailableError
from dgconvert.runtime.base import Backend, StageOutput


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, spinning: bool = False) -> Any:
    """SessionOptions tuned for chaining several sessions on the same cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    so.log_severity_level = 3
    return so


class OnnxRuntimeBackend(Backend):
    """Runs each stage graph with ONNX Runtime (CPU by default, providers configurable)."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        spinning: bool = False,
    ) -> None:
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise BackendUnavailableError(
                "onnxruntime is not installed; fix: pip install onnxruntime"
            ) from exc
        self.providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime providers {missing} are not available (available: {available}). "
                "Fix: pip install onnxruntime-gpu for CUDA/TensorRT providers, or use "
                "providers=['CPUExecutionProvider']."
            )
        self.threads = threads or default_threads()
        self.spinning = spinning
        so = session_options(self.threads, spinning)
        self._sessions = [
            ort.InferenceSession(str(bundle.stage_file(k)), so, providers=self.providers)
            for k in range(bundle.num_stages)
        ]
        self._full: Any | None = None
        self._so = so
        last = bundle.num_stages - 1
        self._wanted = [
            ["features", "score", "label"] if k < last else ["score", "label"]
            for k in range(bundle.num_stages)
        ]
        self._inputs = [[i.name for i in s.get_inputs()] for s in self._sessions]

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        sess = self._sessions[k]
        feeds = {self._inputs[k][0]: inputs}
        if k > 0:
            feeds[self._inputs[k][1]] = keep
        outs = sess.run(self._wanted[k], feeds)
        if len(outs) == 3:
            return StageOutput(outs[0], outs[1], outs[2])
        return StageOutput(None, outs[0], outs[1])

    def run_full(self, images: np.ndarray) -> np.ndarray:
        if self._full is None:
            import onnxruntime as ort

            self._full = ort.InferenceSession(
                str(self.bundle.full_file()), self._so, providers=self.providers
            )
        name = self._full.get_inputs()[0].name
        return self._full.run(None, {name: images})[0]

    def describe(self) -> str:
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        return (
            f"onnxruntime ({', '.join(wanted)}; {self.threads} threads, "
            f"spinning {'on' if self.spinning else 'off'})"
        )
