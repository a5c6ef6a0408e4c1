"""Re-export of :class:`dgconvert.core.errors.CalibrationError` (kept for imports by path)."""

from dgconvert.core.errors import CalibrationError

__all__ = ["CalibrationError"]
