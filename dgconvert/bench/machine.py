"""What the benchmark ran on: CPU model, cores, memory, load, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes competing for the cores)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """A JSON-able description of this machine and the libraries in use."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        usable = os.cpu_count()
    libs = {name: _version(name) for name in
            ("dgconvert", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt")}
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": {k: v for k, v in libs.items() if v is not None},
        "load_average": load_average(),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One line: CPU, cores, memory, Python and library versions."""
    libs = ", ".join(f"{k} {v}" for k, v in info.get("libraries", {}).items())
    return (f"{info.get('cpu')}, {info.get('usable_cores')} usable of {info.get('logical_cores')} "
            f"logical cores, {info.get('memory_gb')} GB RAM; Python {info.get('python')}; {libs}")
