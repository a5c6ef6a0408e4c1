"""The calibration error type."""

from __future__ import annotations

from dgconvert.errors import DGConvertError


class CalibrationError(DGConvertError, ValueError):
    """Calibration inputs do not fit together, or the asked-for target cannot be met."""
