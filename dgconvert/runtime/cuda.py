"""Thin CUDA helpers over ``cuda-python`` (``cuda.bindings.runtime``), imported lazily.

Only what the TensorRT backend and ``dgconvert doctor`` need: device discovery, device and
pinned host buffers, one stream, async copies. Every call checks its ``cudaError_t`` and
raises :class:`CudaError` naming the call.

Written against the cuda-python runtime bindings
(https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html): each
function returns a tuple ``(cudaError_t, *results)``; ``cudaMalloc(size) -> (err, ptr)``,
``cudaMallocHost(size) -> (err, ptr)``, ``cudaMemcpyAsync(dst, src, count, kind, stream)``,
``cudaMemcpy(dst, src, count, kind)``, ``cudaStreamCreate() -> (err, cudaStream_t)``,
``cudaStreamSynchronize(stream)``, ``cudaFree(ptr)`` (device) and ``cudaFreeHost(ptr)`` (pinned),
``cudaGetDeviceCount()``, ``cudaGetDeviceProperties(device) -> (err, cudaDeviceProp)``,
``cudaDriverGetVersion()``/``cudaRuntimeGetVersion()`` (version = 1000*major + 10*minor),
the same calling pattern as TensorRT's ``samples/python/common_runtime.py``.

Handles: a ``cudaStream_t`` is a wrapper object; ``int(stream)`` is the stream handle that
TensorRT's ``execute_async_v3(stream_handle)`` takes. ``stream.getPtr()`` is *not* the handle:
it is the address of the wrapper's own storage (:func:`stream_handle`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.errors import BackendUnavailableError

INSTALL = "pip install cuda-python"
log = logging.getLogger(__name__)


class CudaError(BackendUnavailableError):
    """A CUDA runtime call failed (no driver, no device, out of memory, ...)."""


def load_runtime() -> Any:
    """The ``cuda.bindings.runtime`` module (``cuda.cudart`` for cuda-python < 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError as exc:
            raise BackendUnavailableError(
                "cuda-python is not installed; the TensorRT backend needs it for device "
                f"memory and streams. Fix: {INSTALL} (matching your CUDA driver)."
            ) from exc
    return runtime


def check(result: Any, call: str) -> Any:
    """Unpack ``(err, *values)`` from a cuda-python call; raise :class:`CudaError` on failure.

    Returns ``None``, the single value, or a tuple of values.
    """
    rt = load_runtime()
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        hint = {
            "cudaErrorNoDevice": "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES, nvidia-smi)",
            "cudaErrorInsufficientDriver": "the NVIDIA driver is older than the CUDA runtime; "
            "update the driver or install a cuda-python matching it",
            "cudaErrorMemoryAllocation": "the GPU is out of memory; lower --max-batch or free "
            "other processes' memory",
        }.get(name, "run `dgconvert doctor` to check the driver, runtime and GPUs")
        raise CudaError(f"CUDA call {call} failed with {name}; {hint}.")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def format_cuda_version(v: int) -> str:
    """``12080 -> "12.8"`` (CUDA encodes versions as 1000*major + 10*minor)."""
    if v <= 0:
        return "none"
    return f"{v // 1000}.{(v % 1000) // 10}"


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the driver reports it."""

    index: int
    name: str
    major: int
    minor: int
    memory_bytes: int = 0

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def sm(self) -> str:
        """``"sm90"`` for compute capability 9.0."""
        return f"sm{self.major}{self.minor}"


def _decode(name: Any) -> str:
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip()


def list_gpus() -> list[GpuInfo]:
    """Every CUDA device via cuda-python (raises if cuda-python or the driver is missing)."""
    rt = load_runtime()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    gpus = []
    for i in range(int(count)):
        prop = check(rt.cudaGetDeviceProperties(i), f"cudaGetDeviceProperties({i})")
        gpus.append(
            GpuInfo(i, _decode(prop.name), int(prop.major), int(prop.minor),
                    int(getattr(prop, "totalGlobalMem", 0)))
        )
    return gpus


def current_gpu(device: int = 0) -> GpuInfo:
    """The device the backend runs on; a clear error when there is none."""
    gpus = list_gpus()
    if not gpus:
        raise CudaError("no CUDA GPU found; the TensorRT backend needs an NVIDIA GPU.")
    if not 0 <= device < len(gpus):
        raise CudaError(
            f"device {device} requested but only {len(gpus)} GPU(s) exist "
            f"({', '.join(g.name for g in gpus)}); pass device=0..{len(gpus) - 1}."
        )
    return gpus[device]


def versions() -> dict[str, str]:
    """CUDA driver and runtime versions (``{"driver": "12.8", "runtime": "12.6"}``)."""
    rt = load_runtime()
    return {
        "driver": format_cuda_version(int(check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))),
        "runtime": format_cuda_version(
            int(check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        ),
    }


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=index,name,compute_cap,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        m = re.match(r"^(\d+)\.(\d+)$", parts[2])
        major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        mem = int(float(parts[3]) * 2**20) if len(parts) > 3 and _is_number(parts[3]) else 0
        gpus.append(GpuInfo(int(parts[0]), parts[1], major, minor, mem))
    return gpus


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def nvidia_smi() -> tuple[list[GpuInfo], str | None]:
    """GPUs and driver version from ``nvidia-smi`` when it is on PATH (no cuda-python needed)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,compute_cap,memory.total,driver_version",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    lines = out.strip().splitlines()
    driver = lines[0].split(",")[-1].strip() if lines else None
    return parse_nvidia_smi(out), driver


# -- memory and streams ------------------------------------------------------------------
class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``); freed by :meth:`free`."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(load_runtime().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(load_runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) with a numpy view, for async copies."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(
            check(load_runtime().cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})")
        )
        raw = ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8))
        self._bytes = np.ctypeslib.as_array(raw, (self.nbytes,))

    def view(self, dtype: np.dtype | type, count: int) -> np.ndarray:
        """The first ``count`` elements as a ``dtype`` array (no copy)."""
        dt = np.dtype(dtype)
        if count * dt.itemsize > self.nbytes:
            raise ValueError(f"{count} x {dt} exceeds the pinned buffer ({self.nbytes} bytes)")
        return self._bytes[: count * dt.itemsize].view(dt)

    def free(self) -> None:
        if self.ptr:
            check(load_runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def stream_handle(stream: Any) -> int:
    """The integer handle of a ``cudaStream_t`` / ``CUstream`` (or an int), as TensorRT's
    ``execute_async_v3(stream_handle)`` takes it: ``int(stream)``.

    Never ``stream.getPtr()``: in cuda-python that is the address of the wrapper's storage,
    so TensorRT would enqueue on a garbage stream while the copies run on the real one.
    """
    if stream is None:
        raise CudaError("the CUDA stream was destroyed; create a new runner")
    try:
        return int(stream)
    except (TypeError, ValueError) as exc:
        raise CudaError(
            f"cannot take the handle of a {type(stream).__name__}; expected a cuda-python "
            "cudaStream_t/CUstream (int(stream) is the handle) or an int. Fix: pass the stream "
            "returned by cudaStreamCreate."
        ) from exc


class Stream:
    """One CUDA stream (``cudaStreamCreate``) with async copies and synchronisation."""

    def __init__(self) -> None:
        rt = load_runtime()
        self._rt = rt
        self.handle = check(rt.cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        """The stream handle as an integer, as ``execute_async_v3`` takes it."""
        return stream_handle(self.handle)

    def htod(self, dst: int, src: int, nbytes: int) -> None:
        """Async host -> device copy (``src`` should be pinned for a truly async copy)."""
        if nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(self._rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.handle), "cudaMemcpyAsync(H2D)")

    def dtoh(self, dst: int, src: int, nbytes: int) -> None:
        """Async device -> host copy into pinned memory."""
        if nbytes:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            check(self._rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.handle), "cudaMemcpyAsync(D2H)")

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(self._rt.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def memcpy_htod(dst: int, src: np.ndarray) -> None:
    """Synchronous host -> device copy of a contiguous array (``cudaMemcpy``)."""
    rt = load_runtime()
    src = np.ascontiguousarray(src)
    if src.nbytes:
        check(rt.cudaMemcpy(dst, src.ctypes.data, src.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy(H2D)")


def memcpy_dtoh(dst: np.ndarray, src: int) -> np.ndarray:
    """Synchronous device -> host copy into the contiguous array ``dst`` (``cudaMemcpy``)."""
    rt = load_runtime()
    if dst.nbytes:
        check(rt.cudaMemcpy(dst.ctypes.data, src, dst.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy(D2H)")
    return dst


def set_device(device: int) -> None:
    """Make ``device`` current for the calling thread (``cudaSetDevice``)."""
    check(load_runtime().cudaSetDevice(int(device)), f"cudaSetDevice({device})")
