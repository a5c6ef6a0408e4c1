"""Torch-free runtime: :class:`GatedRunner` chains stage graphs with batch compaction.

Imports only numpy and onnxruntime; TensorRT / CUDA are imported lazily by their backend.
"""

from __future__ import annotations

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GatedResult
from dgconvert.runtime.backends import BACKENDS, backend_class, create_backend
from dgconvert.runtime.base import Backend, StageOutput
from dgconvert.runtime.pool import GatedPool, PoolClosedError, PoolFullError
from dgconvert.runtime.runner import GatedRunner
from dgconvert.runtime.thread_pool import share_thread_pool, shared_threads

__all__ = [
    "BACKENDS",
    "Backend",
    "Bundle",
    "GatedPool",
    "GatedResult",
    "GatedRunner",
    "PoolClosedError",
    "PoolFullError",
    "StageOutput",
    "backend_class",
    "create_backend",
    "share_thread_pool",
    "shared_threads",
]
