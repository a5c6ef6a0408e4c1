"""Real GPU tests: TensorRT engines built and run on this machine's GPU, compared with ONNX
Runtime (CPU) stage by stage and end to end; device-resident chaining; threads.

Every test carries ``@pytest.mark.gpu``; tests/conftest.py skips them with a reason where
TensorRT, cuda-python or an NVIDIA GPU is missing. TF32 is off in the engines and in ONNX
Runtime's CUDA provider (``use_tf32=0``): parity is checked against exact FP32 math.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dgconvert as dg
from dgconvert.convert.tensorrt import BuildOptions, build_engines
from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import InputError
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.select import pick_backend
from dgconvert.runtime.tensorrt_backend import DeviceFeatures, TensorRTBackend, local_engine_key
from tests.models import build

pytestmark = pytest.mark.gpu
MAX = 64
TOL = {"rtol": 1e-3, "atol": 1e-4}  # FP32 vs FP32 (TF32 off): kernel choice, not precision


def _pixels(n: int, fashion: bool) -> np.ndarray:
    if fashion:
        return dg.load_dataset(f"fashion-mnist:test[:{n}]").images
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dg.export(build("resnet"), tmp_path_factory.mktemp("gpu") / "m.dg").path


def _copy(src: Path, tmp_path: Path, name: str) -> Bundle:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return Bundle.load(dst)


@pytest.fixture(scope="module")
def fp32(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    b = _copy(src, tmp_path_factory.mktemp("fp32"), "m.dg")
    build_engines(b, BuildOptions(precision="fp32", max_batch=MAX, opt_batch=32, tf32=False))
    return Bundle.load(b.path)


@pytest.fixture(scope="module")
def data(fashion_available: bool, fp32: Bundle) -> dict[str, Any]:
    pixels = _pixels(300, fashion_available)
    ref = GatedRunner(fp32, backend="onnxruntime")
    rec = ref.collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(fp32.num_gates)]
    return {"pixels": pixels, "x": ref.prepare(pixels), "t": t}


def test_build_writes_engines_for_this_gpu(fp32: Bundle) -> None:
    key, gpu, version = local_engine_key()
    rec = fp32.manifest.engines[key]
    assert rec["tf32"] is False
    assert rec["gpu"] == gpu.name and rec["tensorrt"] == version and rec["max_batch"] == MAX
    for k, s in enumerate(rec["stages"]):
        assert (fp32.path / s["file"]).stat().st_size == s["bytes"] > 0
        assert s["file"] == f"engines/{key}/stage{k}.engine"
    name, _, why = pick_backend(fp32)
    assert name == "tensorrt", why


def test_stage_parity_with_onnxruntime(fp32: Bundle, data: dict[str, Any]) -> None:
    x = data["x"][:MAX]
    trt_be, ort_be = TensorRTBackend(fp32), OnnxRuntimeBackend(fp32)
    t_out, o_out = trt_be.run_stage(0, x, None), ort_be.run_stage(0, x, None)
    rng = np.random.default_rng(0)
    for k in range(1, fp32.num_stages + 1):
        np.testing.assert_allclose(t_out.score, o_out.score, **TOL)
        assert (t_out.label == o_out.label).mean() >= 0.99
        if k == fp32.num_stages:
            break
        np.testing.assert_allclose(t_out.features.to_host(), o_out.features, **TOL)
        n = len(o_out.score)
        keep = np.sort(rng.choice(n, max(1, n * 2 // 3), replace=False)).astype(np.int64)
        t_out, o_out = trt_be.run_stage(k, t_out.features, keep), ort_be.run_stage(k, o_out.features, keep)
    np.testing.assert_allclose(trt_be.run_full(x), ort_be.run_full(x), **TOL)
    trt_be.close()


def test_end_to_end_parity(fp32: Bundle, data: dict[str, Any]) -> None:
    ref = GatedRunner(fp32, backend="onnxruntime", thresholds=data["t"]).predict(data["pixels"])
    runner = GatedRunner(fp32, backend="tensorrt", thresholds=data["t"])
    got = runner.predict(data["pixels"])
    assert runner.max_batch == MAX
    assert (got.labels == ref.labels).mean() >= 0.99
    assert (got.exit_stage == ref.exit_stage).mean() >= 0.99
    assert len(set(got.exit_stage.tolist())) > 1
    runner.close()


def test_device_resident_chaining(fp32: Bundle, data: dict[str, Any]) -> None:
    be = TensorRTBackend(fp32)
    o0 = be.run_stage(0, data["x"][:16], None)
    assert isinstance(o0.features, DeviceFeatures) and not isinstance(o0.features, np.ndarray)
    assert o0.features.shape[0] == 16 and o0.features.ptr != 0
    assert o0.score.dtype == np.float32 and o0.label.dtype == np.int64
    o1 = be.run_stage(1, o0.features, np.array([3, 1, 4], np.int64))
    assert o1.features.ptr != o0.features.ptr and o1.features.shape[0] == 3
    with pytest.raises(InputError, match="stale"):
        be.run_stage(1, o0.features, np.array([0], np.int64))
    with pytest.raises(InputError, match=f"at most {MAX}.*--max-batch"):
        be.run_stage(0, np.zeros((MAX + 1, 1, 28, 28), np.float32), None)
    be.close()


def test_threads_share_a_runner(fp32: Bundle, data: dict[str, Any]) -> None:
    runner = GatedRunner(fp32, backend="tensorrt", thresholds=data["t"])
    ref = runner.predict(data["pixels"])
    results, errors = [], []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(runner.predict(data["pixels"]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for res in results:
        np.testing.assert_array_equal(res.labels, ref.labels)
        np.testing.assert_array_equal(res.exit_stage, ref.exit_stage)
    runner.close()


def test_fp16_engines_agree(src: Path, tmp_path: Path, data: dict[str, Any]) -> None:
    b = _copy(src, tmp_path, "fp16.dg")
    rec = build_engines(b, BuildOptions(precision="fp16", max_batch=MAX))
    assert rec["precision"] == "fp16"
    ref = GatedRunner(b, backend="onnxruntime").collect(data["pixels"])
    got = GatedRunner(b, backend="tensorrt").collect(data["pixels"])
    assert (got.final_labels == ref.final_labels).mean() >= 0.99
    for k in range(b.num_gates):
        assert (got.labels[:, k] == ref.labels[:, k]).mean() >= 0.99


def test_onnxruntime_gpu_io_binding(fp32: Bundle, data: dict[str, Any]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (pip install onnxruntime-gpu)")
    from dgconvert.runtime.onnxruntime_gpu import OnnxRuntimeGpuBackend, OrtFeatures

    cuda_ep = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})  # exact FP32
    be = OnnxRuntimeGpuBackend(fp32, providers=[cuda_ep, "CPUExecutionProvider"])
    out = be.run_stage(0, data["x"][:8], None)
    assert isinstance(out.features, OrtFeatures) and "cuda" in out.features.device()
    np.testing.assert_allclose(out.score, OnnxRuntimeBackend(fp32).run_stage(0, data["x"][:8], None).score,
                               **TOL)
    ref = GatedRunner(fp32, backend="onnxruntime", thresholds=data["t"]).predict(data["pixels"])
    got = GatedRunner(fp32, backend=be, thresholds=data["t"]).predict(data["pixels"])
    assert (got.labels == ref.labels).mean() >= 0.99
