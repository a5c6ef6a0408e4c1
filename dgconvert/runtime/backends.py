"""The backend registry: names -> classes (imported on demand), and ``"auto"``."""

from __future__ import annotations

import importlib
from typing import Any

from dgconvert.core.bundle import Bundle
from dgconvert.runtime.base import Backend
from dgconvert.runtime.select import pick_backend

BACKENDS = {
    "onnxruntime": "dgconvert.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "onnxruntime-gpu": "dgconvert.runtime.onnxruntime_gpu:OnnxRuntimeGpuBackend",
    "tensorrt": "dgconvert.runtime.tensorrt_backend:TensorRTBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (its module is imported on demand)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {[*BACKENDS, 'auto']}")
    mod, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)


def create_backend(bundle: Bundle, name: str = "auto", **options: Any) -> tuple[Backend, str]:
    """Instantiate a backend; ``"auto"`` picks the best available and says why."""
    if name == "auto":
        name, auto_options, reason = pick_backend(bundle)
        options = {**auto_options, **options}
    else:
        reason = "requested"
    return backend_class(name)(bundle, **options), reason
