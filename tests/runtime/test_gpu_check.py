"""benchmarks/gpu_check.py: skips cleanly without a GPU, and its CUDA-layer checks pass
against the strict fake runtime (real cuda-bindings types, asynchronous streams)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import fakes_tensorrt as fakes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_without_a_gpu_every_check_is_a_reported_skip(tmp_path: Path) -> None:
    if fakes.real_rt.cudaGetDeviceCount()[0] == fakes.Err.cudaSuccess:
        pytest.skip("a GPU is visible here")
    out = tmp_path / "report.md"
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[skip] CUDA layer: no usable GPU here" in res.stdout
    assert "every check skipped" in res.stdout
    text = out.read_text()
    assert "**0 ok, 0 failed, 3 skipped**" in text and "| skip | TensorRT engines" in text


def test_cuda_checks_pass_on_the_strict_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT: reported as missing
    out = tmp_path / "report.md"
    assert gpu_check.main(["--out", str(out), "--budget", "60"]) == 0
    rows = {line.split("|")[2].strip(): line.split("|")[1].strip()
            for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    for name in ("devices and versions", "stream handles", "device buffers",
                 "pinned memory, async copies", "ping-pong buffers", "error tuples"):
        assert rows[name] == "ok", (name, out.read_text())
    assert rows["stream handle in another library"] == "skip"  # no CuPy / CUDA PyTorch here
    assert rows["TensorRT engines (pytest -m gpu)"] == "skip"
