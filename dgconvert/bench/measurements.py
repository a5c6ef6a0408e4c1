"""What the timing loop records, before any statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

#: the system id of ``full.onnx`` in a default ONNX Runtime session (what a user would run)
FULL_DEFAULT = "full-default"
#: an int8 bundle's ``full.onnx`` (ONNX Runtime's quantize_static of the fp32 one) in a
#: default session: what a user reaching for ORT's quantization would run
FULL_INT8_DEFAULT = "full-int8-default"


@dataclass
class Measurements:
    """Raw timings: seconds per pass, rows per stage, peak memory; per system and batch."""

    seconds: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    images: dict[str, dict[int, int]] = field(default_factory=dict)  # per system and batch
    rows: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    peak: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    stage_seconds: dict[int, list[list[float]]] = field(default_factory=dict)
    prefix_seconds: dict[int, list[list[float]]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    memory_method: str = ""
