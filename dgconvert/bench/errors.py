"""Errors raised by the benchmark harness."""

from __future__ import annotations

from dgconvert.errors import DGConvertError


class BenchError(DGConvertError, ValueError):
    """A benchmark cannot run as configured (batch sizes, data, model, systems)."""
