"""Peak memory per system: the process's resident-set high-water mark while it ran.

On Linux the kernel's high-water mark (``VmHWM``) is reset before each timed pass by
writing ``5`` to ``/proc/self/clear_refs`` and read after it, so the figure is the peak
RSS of the whole process *during that system's pass*: it includes the interpreter, the
data set and every model loaded in the process, not just the system's own buffers. The
``delta`` is that peak minus the RSS just before the pass (what the pass itself added).
Elsewhere only ``ru_maxrss`` is available; it never goes down, so per-system figures are
then upper bounds (``method`` says which was used).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss() -> int | None:
    """Resident set size now, in bytes (None where /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


class PeakMemory:
    """Resets and reads the process's RSS high-water mark around a pass."""

    def __init__(self) -> None:
        self.method = "vmhwm-reset" if self._try_reset() else "ru_maxrss"

    @staticmethod
    def _try_reset() -> bool:
        try:
            _CLEAR.write_text("5")
        except OSError:
            return False
        return _status_kb("VmHWM") is not None

    def start(self) -> int | None:
        """Reset the high-water mark (when possible); returns the RSS before the pass."""
        if self.method == "vmhwm-reset":
            self._try_reset()
        return current_rss()

    def peak(self) -> int:
        """Peak RSS in bytes since :meth:`start` (vmhwm-reset) or since process start."""
        if self.method == "vmhwm-reset":
            kb = _status_kb("VmHWM")
            if kb is not None:
                return kb * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def describe(self) -> str:
        if self.method == "vmhwm-reset":
            return ("process RSS high-water mark during each system's passes (VmHWM reset via "
                    "/proc/self/clear_refs); includes the data set and all loaded models")
        return "process ru_maxrss (never decreases: an upper bound shared by all systems)"
