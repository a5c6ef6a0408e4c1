"""``dgconvert doctor`` and the CLI's GPU commands on a machine with or without a GPU."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dgconvert.cli import main
from dgconvert.core.bundle import Bundle
from dgconvert.runtime.cuda import GpuInfo
from dgconvert.runtime.doctor import (
    backend_status,
    bundle_status,
    collect,
    format_report,
    version_problems,
)
from dgconvert.runtime.select import Probe

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 9, 0, 80 * 2**30)
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def bundle_path(exported_bundle: Callable[..., Any], tmp_path: Path) -> Path:
    return exported_bundle("resnet").copy_to(tmp_path).path


def _by_name(statuses: list) -> dict:
    return {s.name: s for s in statuses}


def test_everything_missing_names_install_commands() -> None:
    p = Probe(ort_providers=["CPUExecutionProvider"], notes={"tensorrt": "not installed"})
    st = _by_name(backend_status(p, {"onnxruntime": "1.31"}))
    assert not st["tensorrt"].available
    assert st["tensorrt"].missing == ["tensorrt", "cuda-python", "an NVIDIA GPU"]
    assert st["tensorrt"].install == "pip install tensorrt cuda-python"
    assert not st["onnxruntime-gpu"].available
    assert "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu<1.27'" in st["onnxruntime-gpu"].install
    assert st["onnxruntime"].available and st["onnxruntime"].install is None


def test_gpu_machine_with_everything() -> None:
    p = Probe(trt_version="10.8.0.43", cuda_python=True, gpus=[H100],
              ort_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    st = _by_name(backend_status(p, {"onnxruntime": "1.31"}))
    assert all(s.available and s.install is None for s in st.values())
    assert st["tensorrt"].detail == "TensorRT 10.8.0.43"
    assert "CUDAExecutionProvider" in st["onnxruntime-gpu"].detail


def test_only_cuda_python_missing() -> None:
    p = Probe(trt_version="10.8.0.43", cuda_python=False, gpus=[H100], ort_providers=["CPUExecutionProvider"])
    st = _by_name(backend_status(p, {"onnxruntime": "1.31"}))
    assert st["tensorrt"].missing == ["cuda-python"] and st["tensorrt"].install == "pip install cuda-python"


def test_report_text_and_bundle_section(bundle_path: Path) -> None:
    p = Probe(trt_version="10.8.0.43", cuda_python=False, gpus=[H100], ort_providers=["CPUExecutionProvider"])
    r = collect(bundle_path, probe_result=p)
    text = format_report(r)
    assert "[0] NVIDIA H100 80GB HBM3 (compute 9.0, 80 GiB)" in text
    assert "-- tensorrt" in text and "install: pip install cuda-python" in text
    assert "ok onnxruntime" in text
    assert f"Bundle {bundle_path}" in text and "engines: none" in text and "auto backend: onnxruntime" in text
    b = Bundle.load(bundle_path)
    key = "nvidia-h100-80gb-hbm3_sm90_trt10.8"
    b.update_manifest(lambda m: m.engines.update({key: {"tensorrt": "10.8.0.43", "precision": "fp16",
                                                           "max_batch": 256}}))
    ready = Probe(trt_version="10.8.0.43", cuda_python=True, gpus=[H100], ort_providers=["CPUExecutionProvider"])
    st = bundle_status(bundle_path, ready)
    assert st["auto"] == "tensorrt" and st["engines"][key]["precision"] == "fp16"


def test_doctor_runs_on_this_machine(bundle_path: Path) -> None:
    res = CliRunner().invoke(main, ["doctor", str(bundle_path)])
    assert res.exit_code == 0, res.output
    assert "Backends" in res.output and "onnxruntime" in res.output and "auto backend:" in res.output
    if not HAS_TRT:
        assert "install: pip install tensorrt cuda-python" in res.output


@pytest.mark.skipif(HAS_TRT, reason="checks the message on a machine without TensorRT")
def test_build_without_tensorrt_fails_clearly(bundle_path: Path) -> None:
    res = CliRunner().invoke(main, ["build", str(bundle_path), "--precision", "fp16"])
    assert res.exit_code != 0
    assert "TensorRT" in res.output and "pip install tensorrt cuda-python" in res.output
    assert "Traceback" not in res.output
    assert not (bundle_path / "engines").exists()


def test_build_and_doctor_help() -> None:
    for cmd in ("build", "doctor"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
    res = CliRunner().invoke(main, ["build", "--help"])
    for opt in ("--precision", "--max-batch", "--opt-batch", "--workspace", "--timing-cache", "--data"):
        assert opt in res.output


def test_build_rejects_bad_options(bundle_path: Path) -> None:
    res = CliRunner().invoke(main, ["build", str(bundle_path), "--precision", "bf16"])
    assert res.exit_code == 2 and "bf16" in res.output
    res = CliRunner().invoke(main, ["build", str(bundle_path), "--workspace", "lots"])
    assert res.exit_code != 0 and "not understood" in res.output


# -- problems doctor flags (issue 14) ---------------------------------------------------------
def test_driver_older_than_the_runtimes_is_flagged() -> None:
    old = {"driver": "12.8", "runtime": "13.0"}
    versions = {"cuda-python": "13.0.1", "tensorrt": "11.1.0"}
    probs = version_problems(old, versions, {"onnxruntime-gpu": "1.27.0"})
    assert len(probs) == 3
    assert "supports CUDA 12.8, older than cuda-python 13.0.1 (CUDA runtime 13.0)" in probs[0]
    assert "TensorRT 11.1.0 (built for CUDA 13)" in probs[1] and "needs >= 580" in probs[1]
    assert "onnxruntime-gpu 1.27.0 (built for CUDA 13)" in probs[2]
    assert all("pip install 'dgconvert[gpu-cu12]'" in p for p in probs)
    ok = version_problems({"driver": "12.8", "runtime": "12.6"}, {"tensorrt": "10.8.0"},
                          {"onnxruntime-gpu": "1.26.0"})
    assert ok == []
    assert version_problems({"driver": "none", "runtime": "13.0"}, versions, {}) == []


def test_onnxruntime_beside_onnxruntime_gpu_is_flagged() -> None:
    probs = version_problems({}, {}, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.26.0"})
    assert len(probs) == 1 and "#26996" in probs[0] and "pip uninstall -y onnxruntime" in probs[0]


def test_collect_reads_versions_when_the_driver_is_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import fakes_tensorrt as fakes

    gpu = fakes.install(monkeypatch)
    gpu.rt.driver_version, gpu.rt.runtime_version = 12080, 13000
    gpu.rt.device_count = (fakes.Err.cudaErrorInsufficientDriver, None)
    r = collect()
    assert r.cuda["driver"] == "12.8" and r.cuda["runtime"] == "13.0"
    assert "cudaErrorInsufficientDriver" in r.cuda["error"]
    assert any("supports CUDA 12.8, older than cuda-python" in p for p in r.problems)
    st = _by_name(r.backends)
    assert not st["tensorrt"].available and "CUDA driver that cuda-python can use" in st["tensorrt"].detail
    assert "Problems" in format_report(r)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_listed_cuda_provider_that_does_not_load_is_flagged() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime really has the CUDA provider")
    p = Probe(trt_version=None, gpus=[H100],
              ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    r = collect(probe_result=p)
    assert any("CUDAExecutionProvider is listed by onnxruntime but does not load" in x
               for x in r.problems)
    st = _by_name(r.backends)["onnxruntime-gpu"]
    assert not st.available and "listed but does not" in st.detail
    text = format_report(r)
    assert "-- onnxruntime-gpu" in text and "!! CUDAExecutionProvider is listed" in text
