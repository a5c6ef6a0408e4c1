"""``backend="auto"``: TensorRT engines for this GPU if built, else onnxruntime-gpu, else
ONNX Runtime on the CPU, with a sentence saying what was chosen and why the better options
were not.

:func:`probe` looks at the machine once (imports, GPUs, ONNX Runtime providers) without
creating any session; :func:`pick_backend` is a pure decision on a :class:`Probe`, so it is
tested on any machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import BackendUnavailableError
from dgconvert.runtime import cuda
from dgconvert.runtime.tensorrt_backend import engine_key

log = logging.getLogger(__name__)


@dataclass
class Probe:
    """What this machine offers to the backends."""

    trt_version: str | None = None  # None: tensorrt not importable
    cuda_python: bool = False  # cuda-python imports *and* the driver answered (GPUs listed)
    cuda_installed: bool = False  # cuda-python imports (the driver may still fail)
    gpus: list[Any] = field(default_factory=list)  # runtime.cuda.GpuInfo
    ort_providers: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # component -> why unavailable
    failed: dict[str, str] = field(default_factory=dict)  # backend -> why creating it failed


def probe(device: int = 0) -> Probe:
    """Inspect the machine: TensorRT and cuda-python imports, GPUs, ONNX Runtime providers."""
    p = Probe()
    try:
        import onnxruntime as ort

        p.ort_providers = list(ort.get_available_providers())
    except ImportError:
        p.notes["onnxruntime"] = "onnxruntime is not installed (pip install onnxruntime)"
    try:
        import tensorrt

        p.trt_version = str(tensorrt.__version__)
    except ImportError:
        p.notes["tensorrt"] = "tensorrt is not installed (pip install tensorrt cuda-python)"
    except Exception as exc:  # a broken install (missing libnvinfer) must not break auto
        p.notes["tensorrt"] = f"tensorrt is installed but fails to import: {exc}"
    try:
        cuda.load_runtime()
        p.cuda_installed = True
        p.gpus = cuda.list_gpus()
        p.cuda_python = True  # only once the driver answered
    except BackendUnavailableError as exc:
        p.notes["cuda"] = (f"cuda-python is installed but CUDA does not start: {exc}"
                           if p.cuda_installed else str(exc))
        p.gpus = cuda.nvidia_smi()[0]
        log.info("probe: CUDA unusable through cuda-python: %s", p.notes["cuda"])
    if not p.gpus:
        p.notes.setdefault("gpu", "no NVIDIA GPU visible")
    return p


def pick_backend(bundle: Bundle, probe_result: Probe | None = None,
                 device: int = 0) -> tuple[str, dict[str, Any], str]:
    """Return ``(backend name, backend options, reason)`` for ``bundle`` on this machine."""
    p = probe_result if probe_result is not None else probe(device)
    skipped: list[str] = []
    engines = bundle.manifest.engines
    gpu = p.gpus[device] if 0 <= device < len(p.gpus) else None

    # 1. TensorRT engines built for this GPU and TensorRT version
    if "tensorrt" in p.failed:
        skipped.append(f"TensorRT: failed: {p.failed['tensorrt']}")
    elif p.trt_version is None:
        skipped.append(f"TensorRT: {p.notes.get('tensorrt', 'not installed')}")
    elif not p.cuda_python:
        skipped.append("TensorRT: " + p.notes.get(
            "cuda", "cuda-python is not installed (pip install cuda-python)"))
    elif gpu is None:
        skipped.append("TensorRT: no GPU visible")
    else:
        key = engine_key(gpu.name, gpu.major, gpu.minor, p.trt_version)
        rec = engines.get(key)
        if rec is not None and str(rec.get("tensorrt")) == p.trt_version:
            return ("tensorrt", {"device": device},
                    f"TensorRT {p.trt_version} engines built for this GPU ({key}, "
                    f"{rec.get('precision', '?')})")
        if rec is not None:
            skipped.append(f"TensorRT: engines {key} were built with TensorRT {rec.get('tensorrt')}, "
                           f"this is {p.trt_version} (rebuild: dgconvert build {bundle.path})")
        else:
            built = ", ".join(engines) or "none"
            skipped.append(f"TensorRT: no engines for {key} (built: {built}; run "
                           f"`dgconvert build {bundle.path}`)")

    # 2. onnxruntime-gpu
    cuda_ep = "CUDAExecutionProvider" in p.ort_providers
    if "onnxruntime-gpu" in p.failed:
        skipped.append(f"onnxruntime-gpu: failed: {p.failed['onnxruntime-gpu']}")
    elif cuda_ep and gpu is not None:
        providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        why = f"onnxruntime-gpu with the CUDA execution provider on {gpu.name}"
        return ("onnxruntime-gpu", {"providers": providers, "device_id": device},
                f"{why}, features kept on the GPU (I/O binding); " + "; ".join(skipped))
    else:
        skipped.append(
            "onnxruntime-gpu: " + ("no GPU visible" if cuda_ep else
                                   "CUDAExecutionProvider not available (pip install onnxruntime-gpu)")
        )

    # 3. ONNX Runtime on the CPU
    return "onnxruntime", {}, "ONNX Runtime on the CPU; " + "; ".join(skipped)
