"""``backend="auto"``: TensorRT engines for this GPU if built, else onnxruntime-gpu, else
ONNX Runtime on the CPU."""

from __future__ import annotations

from typing import Any

from dgconvert.bundle import Bundle


def pick_backend(bundle: Bundle) -> tuple[str, dict[str, Any], str]:
    """Return ``(backend name, backend options, reason)``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return (
            "onnxruntime",
            {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
            "onnxruntime-gpu with the CUDA execution provider",
        )
    return "onnxruntime", {}, "ONNX Runtime on the CPU (no GPU backend available)"
