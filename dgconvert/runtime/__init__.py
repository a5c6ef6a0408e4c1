"""Torch-free runtime: :class:`GatedRunner` chains stage graphs with batch compaction.

Imports only numpy and onnxruntime; TensorRT / CUDA are imported lazily by their backend.
"""

from __future__ import annotations

import importlib
from typing import Any

from dgconvert.bundle import Bundle
from dgconvert.runtime.base import Backend, StageOutput
from dgconvert.runtime.runner import GatedResult, GatedRunner

BACKENDS = {
    "onnxruntime": "dgconvert.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "onnxruntime-gpu": "dgconvert.runtime.onnxruntime_gpu:OnnxRuntimeGpuBackend",
    "tensorrt": "dgconvert.runtime.tensorrt_backend:TensorRTBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (imported on demand)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {[*BACKENDS, 'auto']}")
    mod, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)


def create_backend(bundle: Bundle, name: str = "auto", **options: Any) -> tuple[Backend, str]:
    """Instantiate a backend; ``"auto"`` picks the best available and says why."""
    if name == "auto":  # picks, and falls back when the pick cannot be created
        from dgconvert.runtime.select import create_auto

        return create_auto(bundle, **options)
    return backend_class(name)(bundle, **options), "requested"


__all__ = [
    "BACKENDS",
    "Backend",
    "Bundle",
    "GatedResult",
    "GatedRunner",
    "StageOutput",
    "backend_class",
    "create_backend",
]
