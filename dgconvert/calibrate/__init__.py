"""Threshold calibration for gated (early-exit) networks, numpy (+ scipy for bounds).

One entry point, one result: given the collection pass (:class:`GateRecords`), ground
truth and per-exit cumulative costs, :func:`calibrate` returns a :class:`CalibrationResult`
with the thresholds of least expected cost whose accuracy meets a target on unseen data
(on average by default; with a stated probability with ``confidence``), compared with the
d-gate paper's sequential rule and a single shared threshold. Accuracies are fractions in
[0, 1]. The searches (:mod:`dgconvert.calibrate.search`) are internal helpers;
:func:`dgconvert.calibrate.workflow.calibrate_bundle` wraps :func:`calibrate` for a bundle.
"""

from __future__ import annotations

from dgconvert.calibrate.bounds import (
    BoundResult,
    accuracy_lower_bound,
    binomial_pvalue,
    clopper_pearson_upper,
    drop_upper_bound,
    fixed_sequence_test,
    paired_drop_pvalue,
    split_indices,
)
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.pipeline import calibrate
from dgconvert.calibrate.report import (
    CalibrationResult,
    FrontierPoint,
    OperatingPoint,
    SplitStats,
    markdown_table,
    plot_frontier,
)
from dgconvert.calibrate.selection import Estimate
from dgconvert.core.exits import GateRecords, Outcome, as_records, simulate
from dgconvert.core.manifest import decode_thresholds, encode_thresholds

__all__ = [
    "BoundResult",
    "CalibrationError",
    "CalibrationResult",
    "Estimate",
    "FrontierPoint",
    "GateRecords",
    "OperatingPoint",
    "Outcome",
    "SplitStats",
    "accuracy_lower_bound",
    "as_records",
    "binomial_pvalue",
    "calibrate",
    "clopper_pearson_upper",
    "decode_thresholds",
    "drop_upper_bound",
    "encode_thresholds",
    "fixed_sequence_test",
    "markdown_table",
    "paired_drop_pvalue",
    "plot_frontier",
    "simulate",
    "split_indices",
]
