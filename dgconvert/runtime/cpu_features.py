"""CPU facts the runtime's choices depend on (read from ``/proc/cpuinfo``, torch-free)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

#: x86 flags of the int8 dot-product instructions that add u8 x s8 products in int32
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def _host_cpuinfo() -> str:
    """This machine's ``/proc/cpuinfo`` (read once), or "" where there is none to read."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return ""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's flags (``cpuinfo``: the text of ``/proc/cpuinfo``, default: this
    machine's), or None where there are none to read (not Linux, not x86)."""
    text = _host_cpuinfo() if cpuinfo is None else cpuinfo
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    return None if line is None else set(line.split(":", 1)[1].split())


def u8s8_saturates(cpuinfo: str | None = None) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels may saturate here: an x86 CPU without
    VNNI/AMX, where they add pairs of products in int16 (``vpmaddubsw``)."""
    flags = cpu_flags(cpuinfo)
    return flags is not None and not VNNI_FLAGS & flags
