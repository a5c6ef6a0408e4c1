"""Operating points for the d-gate paper's Table 1: thresholds calibrated for several
maximum accuracy drops on labelled calibration data (never the benchmark's test data)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.core.bundle import Bundle
from dgconvert.core.manifest import encode_thresholds


def calibration_available() -> bool:
    """Whether :mod:`dgconvert.calibrate` (the threshold search) is installed."""
    return importlib.util.find_spec("dgconvert.calibrate") is not None


NO_EXIT = "nobody exits"


def no_exit_point(bundle: Bundle) -> dict[str, list[float]]:
    """The operating point with every gate off: timed beside the full model, it measures
    what staging itself costs (compaction copies, gate heads, session calls)."""
    return {NO_EXIT: [float("inf")] * bundle.num_gates}


def point_name(drop_points: float) -> str:
    """``0.3`` -> ``"-0.3pt"``: the name of an operating point in tables and JSON."""
    return f"-{drop_points:g}pt"


def calibrated_points(
    bundle: Bundle,
    images: np.ndarray,
    labels: np.ndarray,
    drops: Sequence[float],
    *,
    backend: str = "onnxruntime",
    holdout: float = 0.0,
    seed: int = 0,
    gate_costs: Any = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Thresholds for each maximum drop (in accuracy points) below the full model.

    One collection pass (every gate on every calibration image), then
    :func:`dgconvert.calibrate.calibrate` with ``max_drop = points / 100`` per entry, priced
    in manifest FLOPs, or with ``gate_costs`` (measured ms,
    :func:`dgconvert.bench.calibration.gate_costs_ms`) by
    :func:`~dgconvert.calibrate.gates_that_pay.calibrate_gates_that_pay` (gates that do not
    pay are off). The bundle's manifest is not modified. Returns ``(name -> thresholds,
    details)``.
    """
    if not calibration_available():
        raise BenchError(
            "operating points need dgconvert.calibrate, which is not installed here; expected "
            "the calibrate package. Fix: use the bundle's thresholds (--thresholds) instead."
        )
    from dgconvert.calibrate import calibrate
    from dgconvert.calibrate.collect import collect_records
    from dgconvert.calibrate.gates_that_pay import calibrate_gates_that_pay

    if labels is None or len(labels) != len(images):
        raise BenchError("calibration needs one label per image; got "
                         f"{None if labels is None else len(labels)} for {len(images)} images")
    records, _ = collect_records(bundle, images, backend=backend)
    full_acc = float((records.final_labels == labels).mean())
    points: dict[str, list[float]] = {}
    details: dict[str, Any] = {"calibration_images": int(len(images)),
                               "full_accuracy": full_acc, "points": {}}
    for d in drops:
        if d < 0:
            raise BenchError(f"a maximum drop must be >= 0 points, got {d}")
        options = {"max_drop": d / 100.0, "holdout": holdout, "seed": seed,
                   "num_classes": bundle.num_classes, "frontier_points": 0}
        res = (calibrate(records, labels, bundle.exit_costs(), **options) if gate_costs is None
               else calibrate_gates_that_pay(records, labels, gate_costs, cost_unit="ms",
                                             **options))
        t = [float(v) for v in res.ours.thresholds]
        points[point_name(d)] = t
        details["points"][point_name(d)] = {
            "max_drop_points": d, "thresholds": encode_thresholds(t),
            "target_accuracy": float(res.target_accuracy), "method": res.method,
            **({"gates_that_pay": res.selection["gates_that_pay"]} if gate_costs else {})}
    return points, details
