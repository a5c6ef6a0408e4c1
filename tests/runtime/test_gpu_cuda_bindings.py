"""dgconvert.runtime.cuda against the real ``cuda-bindings`` package (no GPU needed).

Handle, pointer and error-tuple semantics come from the real wheel: ``cudaStream_t``,
``cudaError_t`` and the runtime calls, which on a machine without a driver return
``(cudaErrorInsufficientDriver, None)``. Where a call needs a GPU, the strict fake runtime of
tests/fakes_tensorrt.py (real types) stands in for the driver; ``gpu`` tests use the GPU.
"""

from __future__ import annotations

import ctypes
import types
from typing import Any

import numpy as np
import pytest

from dgconvert.runtime import cuda
from dgconvert.runtime.select import pick_backend, probe
from tests import fakes_tensorrt as fakes

rt = pytest.importorskip("cuda.bindings.runtime", reason="pip install cuda-bindings (dev extra)")
driver = pytest.importorskip("cuda.bindings.driver")
Err = rt.cudaError_t


def _has_driver() -> bool:
    return rt.cudaGetDeviceCount()[0] == Err.cudaSuccess


def test_stream_handle_is_int_of_the_wrapper_not_getptr() -> None:
    h = rt.cudaStream_t(0x5EED)
    assert cuda.stream_handle(h) == 0x5EED
    assert h.getPtr() != 0x5EED  # the wrapper's storage address: never the handle
    assert cuda.stream_handle(driver.CUstream(0xBEEF)) == 0xBEEF
    assert cuda.stream_handle(7) == 7
    with pytest.raises(cuda.CudaError, match="destroyed"):
        cuda.stream_handle(None)
    with pytest.raises(cuda.CudaError, match="got|cannot take the handle of a str.*int\\(stream\\)"):
        cuda.stream_handle("stream")


def test_check_unpacks_real_error_tuples() -> None:
    assert cuda.check((Err.cudaSuccess, 12080), "cudaDriverGetVersion") == 12080
    assert cuda.check((Err.cudaSuccess,), "cudaFree") is None
    assert cuda.check((Err.cudaSuccess, 1, 2), "x") == (1, 2)
    with pytest.raises(cuda.CudaError, match="cudaMalloc\\(8\\) failed with cudaErrorMemoryAllocation.*"
                                             "out of memory"):
        cuda.check((Err.cudaErrorMemoryAllocation, None), "cudaMalloc(8)")
    # a real call: the driver version is an int (0 without a driver)
    version = cuda.check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    assert isinstance(version, int) and version >= 0


@pytest.mark.skipif(_has_driver(), reason="checks the no-driver path")
def test_list_gpus_without_driver_names_the_error() -> None:
    with pytest.raises(cuda.CudaError, match="cudaGetDeviceCount failed with "
                                             "cudaErrorInsufficientDriver.*update the driver"):
        cuda.list_gpus()


@pytest.mark.skipif(_has_driver(), reason="checks the no-driver path")
def test_probe_with_bindings_but_no_driver_is_not_usable(tmp_path: Any) -> None:
    """cuda-python imports here but the driver does not answer: not usable for TensorRT."""
    p = probe()
    assert p.cuda_installed and not p.cuda_python
    assert "cuda-python is installed but CUDA does not start" in p.notes["cuda"]
    assert "cudaErrorInsufficientDriver" in p.notes["cuda"]


def test_probe_marks_cuda_python_only_once_gpus_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """select.probe set cuda_python=True before list_gpus() succeeded (issue 14, item 5)."""
    gpu = fakes.install(monkeypatch)
    gpu.rt.device_count = (Err.cudaErrorNoDevice, None)
    p = probe()
    assert p.trt_version == "10.8.0.43" and p.cuda_installed and not p.cuda_python
    assert "cudaErrorNoDevice" in p.notes["cuda"]
    b = types.SimpleNamespace(manifest=types.SimpleNamespace(engines={}), path="m.dg")
    name, _, why = pick_backend(b, p)  # type: ignore[arg-type]
    assert name == "onnxruntime" and "CUDA does not start" in why and "cudaErrorNoDevice" in why
    gpu.rt.device_count = (Err.cudaSuccess, 1)
    p = probe()
    assert p.cuda_python and [g.name for g in p.gpus] == [fakes.GPU_NAME]


def test_buffers_and_streams_use_the_matching_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device buffers free with cudaFree, pinned with cudaFreeHost; streams have distinct
    handles; async copies land at synchronize."""
    gpu = fakes.install(monkeypatch)
    dev, pin = cuda.DeviceBuffer(64), cuda.PinnedBuffer(64)
    assert dev.ptr in gpu.rt.device and pin.ptr in gpu.rt.pinned
    assert gpu.rt.cudaFree(pin.ptr) == (Err.cudaErrorInvalidValue,)  # the fake is strict
    s1, s2 = cuda.Stream(), cuda.Stream()
    assert isinstance(s1.handle, rt.cudaStream_t) and s1.ptr != s2.ptr
    assert s1.ptr == int(s1.handle) and s1.ptr != s1.handle.getPtr()
    src = pin.view(np.float32, 16)
    src[:] = np.arange(16)
    s1.htod(dev.ptr, pin.ptr, 64)
    src[:] = -1  # nothing has run yet: the copy sees the buffer at synchronize
    s1.synchronize()
    np.testing.assert_array_equal(cuda.memcpy_dtoh(np.empty(16, np.float32), dev.ptr), -np.ones(16))
    with pytest.raises(cuda.CudaError, match="cudaMemcpyAsync\\(H2D\\) failed with cudaErrorInvalidValue"):
        s1.htod(dev.ptr, pin.ptr, 65)  # past the end of the allocation
    dev.free()
    pin.free()
    dev.free()  # idempotent
    s1.destroy()
    s2.destroy()
    assert not gpu.rt.device and not gpu.rt.pinned and not gpu.rt.streams
    with pytest.raises(cuda.CudaError, match="destroyed"):
        _ = s1.ptr


@pytest.mark.gpu
def test_real_gpu_stream_roundtrip() -> None:
    """On a GPU: a ping-pong of copies through device memory on a real stream."""
    if not _has_driver():
        pytest.skip("no CUDA driver")
    x = np.arange(1024, dtype=np.float32)
    dev, pin = cuda.DeviceBuffer(x.nbytes), cuda.PinnedBuffer(x.nbytes)
    s = cuda.Stream()
    pin.view(np.float32, x.size)[:] = x
    s.htod(dev.ptr, pin.ptr, x.nbytes)
    pin.view(np.float32, x.size)[:] = 0
    s.dtoh(pin.ptr, dev.ptr, x.nbytes)
    s.synchronize()
    np.testing.assert_array_equal(pin.view(np.float32, x.size), x)
    assert s.ptr == int(s.handle) != 0
    ctypes.memset(pin.ptr, 0, x.nbytes)
    s.destroy()
    dev.free()
    pin.free()
