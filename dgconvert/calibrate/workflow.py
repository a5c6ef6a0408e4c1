"""`calibrate_bundle`: the bundle-level wrapper of :func:`calibrate` (collection pass,
calibration, write-back). It returns the same :class:`CalibrationResult`, with the bundle
context (data, digests, cache use) in ``result.context``.

Measured costs come from the caller (``exit_costs``; the CLI measures them with
:mod:`dgconvert.bench.calibration`), so this layer never times anything itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dgconvert.calibrate.collect import bundle_digest, collect_records
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.gates_that_pay import (
    GateCosts,
    calibrate_gates_that_pay,
    describe_gates_that_pay,
)
from dgconvert.calibrate.pipeline import calibrate
from dgconvert.calibrate.precision import describe_drops, drops, fp32_reference, fp32_target
from dgconvert.calibrate.report import CalibrationResult
from dgconvert.core.bundle import Bundle
from dgconvert.core.manifest import Manifest, ThresholdInfo, now_iso, portable
from dgconvert.data import Dataset, load_dataset


def load_data(bundle: str | Path | Bundle, data: str) -> tuple[Bundle, Dataset]:
    """The bundle and the labelled data set of a ``--data`` spec, checked against it."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = load_dataset(data, num_classes=b.num_classes)
    ds.require_labels("calibration")
    return b, ds


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(100.0 * float(fraction), 10)


def calibrate_bundle(
    bundle: str | Path | Bundle,
    data: str,
    *,
    target_accuracy: float | None = None,
    max_drop: float | None = None,
    confidence: float | None = None,
    holdout: float | None = None,
    exit_costs: Sequence[float] | None = None,
    gate_costs: GateCosts | None = None,
    cost: str = "flops",
    backend: str = "auto",
    seed: int = 0,
    write: bool = True,
    progress: bool = False,
    dataset: Dataset | None = None,
    drop_vs: str = "fp32",
    source: str | Path | None = None,
    **backend_options: Any,
) -> CalibrationResult:
    """Calibrate ``bundle`` on labelled ``data`` (a ``--data`` spec; ``dataset``: the loaded
    data set, if the caller has it already).

    ``target_accuracy`` and ``max_drop`` are fractions (0.947; 0.003 = 0.3 points), as for
    :func:`calibrate` (the command line takes percent and points). ``exit_costs``: cumulative cost per exit point (default: the manifest's FLOPs);
    with ``cost="latency"`` they must be given, in ms, or ``gate_costs`` (measured stage and
    gate costs: the gates that do not pay for themselves are turned off,
    :mod:`~dgconvert.calibrate.gates_that_pay`). With ``write`` the thresholds and the
    calibration record go into the manifest (:func:`write_calibration`); without it nothing
    is written anywhere (the records cache included). An int8 bundle's ``max_drop`` is
    measured against the fp32 source's full model (``drop_vs="fp32"``, found by digest or
    at ``source``) or its own (``"int8"``); both drops go into ``result.context``.
    """
    if dataset is None:
        b, ds = load_data(bundle, data)
    else:
        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        ds = dataset
    y = ds.require_labels("calibration")
    if cost not in ("flops", "latency"):
        raise CalibrationError(f"cost must be 'flops' or 'latency', got {cost!r}")
    if cost == "latency" and exit_costs is None and gate_costs is None:
        raise CalibrationError(
            "cost='latency' needs the measured costs: pass gate_costs= (from "
            "dgconvert.bench.calibration.gate_costs_ms) or exit_costs= (ms per exit point, "
            "from dgconvert.bench.calibration.latency_exit_costs)"
        )
    if gate_costs is not None and (cost != "latency" or exit_costs is not None):
        raise CalibrationError(
            "gate_costs= are measured milliseconds: use them with cost='latency' and without "
            "exit_costs=")
    ref = fp32_reference(b, ds.images, y, drop_vs, source)
    if ref is not None and ref.drop_vs == "fp32" and max_drop is not None:
        target_accuracy, max_drop = fp32_target(ref, max_drop, holdout, confidence, seed), None
    fingerprint, digest = ds.fingerprint(), bundle_digest(b)
    records, cached = collect_records(
        b, ds.images, fingerprint, backend=backend, progress=progress, digest=digest,
        write_cache=write, **backend_options
    )
    options = {"target_accuracy": target_accuracy, "max_drop": max_drop,
               "confidence": confidence, "holdout": holdout, "seed": seed,
               "num_classes": b.num_classes, "cost_unit": "ms" if cost == "latency" else "flops"}
    if gate_costs is not None:
        result = calibrate_gates_that_pay(records, y, gate_costs, **options)
    else:
        costs = b.exit_costs() if exit_costs is None else list(exit_costs)
        result = calibrate(records, y, costs, **options)
    context = {
        "data": portable(data),
        "data_hash": fingerprint,
        "bundle_digest": digest,
        "cost": cost,
        # recorded in the CLI's units: percent and points
        "requested": {"target_acc": _percent(target_accuracy), "max_drop": _percent(max_drop),
                      "confidence": confidence},
        "records_cached": cached,
        "created": now_iso(),
    }
    if ref is not None:
        context["precision"] = drops(ref, result)
    result = replace(result, context=context)
    if write:
        write_calibration(b, result)
    return result


def write_calibration(bundle: Bundle, result: CalibrationResult) -> None:
    """Write the thresholds and the calibration record (without the frontier) into the
    bundle's manifest, atomically."""
    record = result.to_dict()
    data = result.context.get("data", "records")
    created = result.context.get("created") or now_iso()

    def update(m: Manifest) -> None:
        m.thresholds = ThresholdInfo([float(t) for t in result.thresholds],
                                     f"calibration ({portable(data)}, target "
                                     f"{result.target_accuracy:.4f})", created)
        m.calibration = {k: v for k, v in record.items() if k != "frontier"}

    bundle.update_manifest(update)


def summary(result: CalibrationResult, written: bool) -> str:
    """One paragraph for the terminal: the thresholds, what they promise and cost."""
    full = result.full.calibration.accuracy
    text = (
        f"thresholds {[round(t, 4) for t in result.thresholds]} ({result.method}): accuracy "
        f"{100 * result.accuracy:.2f} % on the calibration data (full {100 * full:.2f} %)"
    )
    exp = result.expected
    unit = "ms" if result.cost_unit == "ms" else "of the full model's cost"
    if exp is not None:
        lo, hi = exp.drop_interval
        a_lo, a_hi = exp.accuracy_interval
        cost = (
            f"{exp.cost:.3f} ms/image" if result.cost_unit == "ms"
            else f"{100 * exp.cost_fraction:.1f} % {unit}"
        )
        text += (
            f"; expected on unseen data (n = {exp.n} held out): accuracy "
            f"{100 * exp.accuracy:.2f} % (90 % interval {100 * a_lo:.2f}–{100 * a_hi:.2f}), "
            f"drop {100 * exp.drop:.2f} pt ({100 * lo:.2f}–{100 * hi:.2f}), cost {cost}"
        )
    elif result.bound is not None:
        bd = result.bound
        what = (
            f"drop <= {100 * bd.drop_upper_bound:.2f} pt" if bd.drop_upper_bound is not None
            else f"accuracy >= {100 * bd.lower_bound:.2f} %"
        )
        text += (
            f"; certified with confidence {bd.confidence:g}: {what} on unseen data; cost "
            f"{100 * bd.cost_fraction:.1f} % {unit} on the {bd.n_test} test samples"
        )
    else:
        text += f", cost {100 * result.cost_fraction:.1f} % {unit}"
    if result.fallback:
        text += (
            "; nothing gated passed"
            + (" the test" if result.bound is not None else " selection")
            + ": the full model (all gates off) is returned"
        )
    text += f". Promise: {result.promise}"
    if "precision" in result.context:
        text += ". " + describe_drops(result.context["precision"])
    if "gates_that_pay" in result.selection:
        text += ". " + describe_gates_that_pay(result.selection["gates_that_pay"])
    return text + ("; written to the manifest" if written else "; dry run: nothing written")
