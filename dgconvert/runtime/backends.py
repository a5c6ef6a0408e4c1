"""The backend registry: names -> classes (imported on demand), and ``"auto"``."""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BackendOptionError, BackendUnavailableError
from dgconvert.runtime.base import Backend
from dgconvert.runtime.select import Probe, pick_backend, probe

log = logging.getLogger(__name__)

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
    """Instantiate a backend; ``"auto"`` picks the best available (falling back when the
    pick cannot be created) and says why."""
    if name == "auto":
        return create_auto(bundle, **options)
    return backend_class(name)(bundle, **options), "requested"


#: options only a GPU backend takes; dropped when ``auto`` falls back to the CPU
_GPU_OPTIONS = ("providers", "device", "device_id", "device_type", "key")


def create_auto(bundle: Bundle, probe_result: Probe | None = None, device: int = 0,
                **options: Any) -> tuple[Backend, str]:
    """Create the backend :func:`pick_backend` chooses; when creating it raises
    :class:`BackendUnavailableError` (e.g. a CUDA provider that is listed but does not load),
    pick again without it. Returns ``(backend, reason)``; the reason names every failure."""
    p = probe(device) if probe_result is None else dataclasses.replace(
        probe_result, failed=dict(probe_result.failed))  # the caller's probe stays as it was
    while True:
        name, auto_options, reason = pick_backend(bundle, p, device)
        opts = {**auto_options, **options}
        if name == "onnxruntime":
            opts = {k: v for k, v in opts.items() if k not in _GPU_OPTIONS}
        try:
            return backend_class(name)(bundle, **opts), reason
        except BackendOptionError:
            raise  # a wrong option is the caller's error, not a missing backend
        except BackendUnavailableError as exc:
            if name == "onnxruntime":
                raise
            log.warning("backend auto: %s failed (%s); picking again without it", name, exc)
            p.failed[name] = str(exc)

