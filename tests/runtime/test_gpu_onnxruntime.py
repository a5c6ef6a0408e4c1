"""The onnxruntime-gpu backend and ``backend="auto"`` when a GPU path cannot start (CPU).

``onnxruntime.get_available_providers()`` lists what a package was built with, not what
loads; these tests make it list ``CUDAExecutionProvider`` on this CPU-only onnxruntime,
whose sessions then really fall back to the CPU, which is the silent-fallback case.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from dgconvert.convert.tensorrt import BuildOptions, build_engines
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BackendUnavailableError
from dgconvert.runtime import GatedRunner, onnxruntime_gpu
from dgconvert.runtime.backends import create_auto
from dgconvert.runtime.cuda import GpuInfo
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.onnxruntime_gpu import OnnxRuntimeGpuBackend, OrtFeatures, provider_loads
from dgconvert.runtime.select import Probe
from tests import fakes_tensorrt as fakes

CUDA_EP = "CUDAExecutionProvider"
pytestmark = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


@pytest.fixture(scope="module")
def bundle(exported_bundle: Callable[..., Any]) -> Bundle:
    return exported_bundle("resnet").bundle  # read only: tests that change it copy it


@pytest.fixture
def cuda_listed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """onnxruntime lists the CUDA provider (its libraries cannot load here); records
    preload_dlls calls."""
    if CUDA_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime really has the CUDA provider")
    calls: list[int] = []
    listed = [CUDA_EP, *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(listed))
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    monkeypatch.setattr(onnxruntime_gpu, "_preloaded", [])
    return calls


def test_listed_cuda_provider_that_does_not_load_is_unavailable(bundle: Bundle,
                                                                  cuda_listed: list[int]) -> None:
    with pytest.raises(BackendUnavailableError, match=r"asked for CUDAExecutionProvider for "
                       r"stage 0, but the session runs on \['CPUExecutionProvider'\].*"
                       r"onnxruntime-gpu<1.27"):
        OnnxRuntimeGpuBackend(bundle)
    assert cuda_listed == [1]  # preload_dlls() was called before the sessions
    why = provider_loads(CUDA_EP)
    assert why is not None and "runs on ['CPUExecutionProvider']" in why
    assert cuda_listed == [1]  # once per process
    assert provider_loads("CPUExecutionProvider") is None


def test_cpu_provider_keeps_working_through_io_binding(bundle: Bundle) -> None:
    be = OnnxRuntimeGpuBackend(bundle, providers=["CPUExecutionProvider"], device_type="cpu")
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    out = be.run_stage(0, x, None)
    assert isinstance(out.features, OrtFeatures)
    ref = OnnxRuntimeBackend(bundle).run_stage(0, x, None)
    np.testing.assert_allclose(out.score, ref.score, rtol=1e-5, atol=1e-6)


def test_auto_falls_back_from_onnxruntime_gpu_with_the_reason(bundle: Bundle,
                                                              cuda_listed: list[int]) -> None:
    p = Probe(gpus=[GpuInfo(0, fakes.GPU_NAME, 9, 0)], ort_providers=[CUDA_EP, "CPUExecutionProvider"])
    be, why = create_auto(bundle, p, threads=1)
    assert type(be) is OnnxRuntimeBackend and be.threads == 1
    assert why.startswith("ONNX Runtime on the CPU")
    assert "onnxruntime-gpu: failed: ONNX Runtime was asked for CUDAExecutionProvider" in why


def test_runner_auto_falls_back_from_tensorrt_that_cannot_start(
        bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_listed: list[int]) -> None:
    import shutil

    b = Bundle.load(shutil.copytree(bundle.path, tmp_path / "m.dg"))
    gpu = fakes.install(monkeypatch)
    build_engines(b, BuildOptions(max_batch=8, full=False))
    gpu.trt.cuda_broken = True  # TensorRT's Runtime returns nullptr
    runner = GatedRunner(b, backend="auto")
    why: Any = runner.backend_reason
    assert type(runner.backend) is OnnxRuntimeBackend
    assert "TensorRT: failed: TensorRT 10.8.0.43 could not create its Runtime" in why
    assert "onnxruntime-gpu: failed:" in why
    x = np.random.default_rng(1).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    assert runner.predict(x).labels.shape == (4,)
