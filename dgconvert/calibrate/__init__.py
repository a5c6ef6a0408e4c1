"""Threshold calibration for gated (early-exit) networks, numpy (+ scipy for bounds).

Given the collection pass (:class:`GateRecords`), ground truth and per-exit cumulative
costs, :func:`calibrate` picks the thresholds of least expected cost whose accuracy meets
a target, optionally certified on held-out data, and compares them with the d-gate paper's
sequential rule and a single shared threshold. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from dgconvert.calibrate.bounds import (
    BoundResult,
    accuracy_lower_bound,
    binomial_pvalue,
    clopper_pearson_upper,
    fixed_sequence_test,
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
from dgconvert.calibrate.search import (
    Candidate,
    SearchResult,
    brute_force_search,
    search,
    sequential_search,
    shared_search,
)
from dgconvert.core.exits import GateRecords, Outcome, as_records, simulate
from dgconvert.core.manifest import decode_thresholds, encode_thresholds

__all__ = [
    "BoundResult",
    "CalibrationError",
    "CalibrationResult",
    "Candidate",
    "FrontierPoint",
    "GateRecords",
    "OperatingPoint",
    "Outcome",
    "SearchResult",
    "SplitStats",
    "accuracy_lower_bound",
    "as_records",
    "binomial_pvalue",
    "brute_force_search",
    "calibrate",
    "clopper_pearson_upper",
    "decode_thresholds",
    "encode_thresholds",
    "fixed_sequence_test",
    "markdown_table",
    "plot_frontier",
    "search",
    "sequential_search",
    "shared_search",
    "simulate",
    "split_indices",
]
