"""Re-export of :class:`dgconvert.core.errors.BenchError` (kept for imports by path)."""

from dgconvert.core.errors import BenchError

__all__ = ["BenchError"]
