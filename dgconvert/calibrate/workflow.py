"""`calibrate_bundle`: the collection pass, the search, the report and the write-back.

This is what ``dgconvert calibrate`` runs; the CLI only parses options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.calibrate.collect import bundle_digest, collect_records, latency_exit_costs
from dgconvert.calibrate.pipeline import calibrate
from dgconvert.calibrate.report import CalibrationResult, markdown_table
from dgconvert.core.bundle import Bundle
from dgconvert.core.manifest import Manifest, ThresholdInfo, now_iso


@dataclass
class CalibrationOutcome:
    result: CalibrationResult
    record: dict[str, Any]  # the JSON report / manifest calibration record
    table: str  # Markdown, d-gate paper Table 1 style
    summary: str  # one paragraph for the terminal


def measure_rows(
    bundle: Bundle, images: np.ndarray, result: CalibrationResult, batch_size: int,
    backend: str, **backend_options: Any,
) -> dict[str, float]:
    """Measured ms/image of the full model and of each row's thresholds on the backend:
    one interleaved run of :func:`dgconvert.bench.run_benchmark` (same timing as ``bench``)."""
    from dgconvert.bench import BenchConfig, run_benchmark

    x = images[:2048]
    size = min(batch_size, len(x))
    rows = {name: list(getattr(result, name).thresholds) for name in ("ours", "sequential", "shared")}
    config = BenchConfig(batch_sizes=[size], repeats=3, warmup=1, samples=len(x), progress=False)
    rep = run_benchmark(bundle, x, config=config, backend=backend, operating_points=rows,
                        backend_options=backend_options)
    ms = {"full": rep.result("full", size).ms.median}
    ms.update({name: rep.result(f"gated[{name}]", size).ms.median for name in rows})
    return ms


def calibrate_bundle(
    bundle: str | Path | Bundle,
    data: str,
    *,
    target_acc: float | None = None,
    max_drop: float | None = None,
    confidence: float | None = None,
    holdout: float = 0.3,
    cost: str = "flops",
    batch_size: int = 64,
    measure: bool = False,
    backend: str = "auto",
    seed: int = 0,
    write: bool = True,
    progress: bool = False,
    **backend_options: Any,
) -> CalibrationOutcome:
    """Calibrate ``bundle`` on labelled ``data`` (a ``--data`` spec).

    ``target_acc`` is in percent (94.7) and ``max_drop`` in points (0.3), as on the command
    line. With ``write`` the thresholds and the calibration record go into the manifest.
    """
    from dgconvert.data import load_dataset

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = load_dataset(data, num_classes=b.num_classes)
    y = ds.require_labels("calibration")
    fingerprint, digest = ds.fingerprint(), bundle_digest(b)
    records, cached = collect_records(
        b, ds.images, fingerprint, backend=backend, progress=progress, digest=digest,
        **backend_options
    )
    if cost == "latency":
        exit_costs = latency_exit_costs(
            b, ds.images, backend=backend, batch_size=batch_size, **backend_options
        )
        unit = "ms"
    else:
        exit_costs, unit = b.exit_costs(), "flops"
    result = calibrate(
        records, y, exit_costs,
        target_acc=None if target_acc is None else target_acc / 100.0,
        max_drop=None if max_drop is None else max_drop / 100.0,
        confidence=confidence, holdout=holdout, seed=seed,
        num_classes=b.num_classes, cost_unit=unit,
    )
    latency = None
    if measure:
        latency = measure_rows(b, ds.images, result, batch_size, backend, **backend_options)
    record = {
        **result.to_dict(),
        "data": data,
        "data_hash": fingerprint,
        "bundle_digest": digest,
        "cost": cost,
        "requested": {"target_acc": target_acc, "max_drop": max_drop, "confidence": confidence},
        "records_cached": cached,
        "measured_ms_per_image": latency,
        "created": now_iso(),
    }
    if write:
        def update(m: Manifest) -> None:
            m.thresholds = ThresholdInfo(
                [float(t) for t in result.thresholds],
                f"calibration ({data}, target {result.target_accuracy:.4f})",
                record["created"],
            )
            m.calibration = {k: v for k, v in record.items() if k != "frontier"}

        b.update_manifest(update)
    held = result.heldout_accuracy
    summary = (
        f"thresholds {[round(t, 4) for t in result.thresholds]} ({result.method}): accuracy "
        f"{100 * result.accuracy:.2f} % (full {100 * result.full_accuracy:.2f} %)"
        + (f", held-out {100 * held:.2f} %" if held is not None else "")
        + f", cost {100 * result.cost_fraction:.1f} % of the full model"
        + ("; written to the manifest" if write else "; dry run: manifest unchanged")
    )
    return CalibrationOutcome(result, record, markdown_table(result, latency_ms=latency), summary)
