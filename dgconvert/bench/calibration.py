"""Timing for ``dgconvert calibrate``: measured stage and gate costs (``--cost latency``:
:func:`gate_costs_ms`; per-exit latency alone: :func:`latency_exit_costs`) and measured
ms/image of the calibrated rows (``--measure``), all on the chosen backend.

These live in the bench layer so that :mod:`dgconvert.calibrate` never imports it; the CLI
passes the measured exit costs into the calibration and times the result afterwards.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.bench.harness import SETTLE_S, BenchConfig, run_benchmark
from dgconvert.bench.systems import StageProbe
from dgconvert.calibrate import CalibrationResult
from dgconvert.calibrate.gates_that_pay import GateCosts
from dgconvert.core.bundle import Bundle
from dgconvert.runtime import GatedRunner

MEASURE_ROWS = ("ours", "sequential", "shared")


def _batch_size(images: np.ndarray, batch_size: int, what: str) -> int:
    """The batch size to time ``what`` at: ``batch_size``, or every image when fewer."""
    if len(images) == 0:
        raise BenchError(
            f"--cost latency needs at least one image to time {what}; got none. "
            "Fix: pass labelled data with images, or use --cost flops.")
    if batch_size < 1:
        raise BenchError(f"--batch-size must be >= 1, got {batch_size}")
    return min(batch_size, len(images))


def latency_exit_costs(
    bundle: Bundle,
    images: np.ndarray,
    *,
    backend: str = "auto",
    batch_size: int = 64,
    repeats: int = 3,
    **backend_options: Any,
) -> list[float]:
    """Cumulative measured ms/image of exiting at each point (each stage timed alone on full
    batches on the chosen backend). Batches hold ``batch_size`` images, or every image
    when fewer are given."""
    size = _batch_size(images, batch_size, "the stages")
    runner = GatedRunner(bundle, backend=backend, max_batch=size, **backend_options)
    try:
        probe = StageProbe(runner)
        x = images[: max(size, min(len(images), 4 * size))]
        probe.reset()
        probe.run(x[:size])  # warm-up
        probe.reset()
        for _ in range(repeats):
            for s in range(0, len(x) - size + 1, size):
                probe.run(x[s : s + size])
    finally:
        runner.close()
    rows = repeats * (len(x) // size) * size
    per_stage = [1000.0 * t / rows for t in probe.seconds]
    return [float(v) for v in np.cumsum(per_stage)]


def gate_costs_ms(
    bundle: Bundle,
    images: np.ndarray,
    *,
    backend: str = "auto",
    batch_size: int = 64,
    repeats: int = 5,
    **backend_options: Any,
) -> GateCosts:
    """What each gate costs when it is on, and each stage without its gate, in ms/image on
    the backend at ``batch_size`` (:class:`~dgconvert.calibrate.gates_that_pay.GateCosts`).

    The runner runs batches with nobody exiting, every gate on, every gate off (the full
    model's cost) and each gate off alone, interleaved for ``repeats`` rounds on the path
    that batch size takes; a gate's cost is the median over rounds of (all on - that gate
    off), at least 0. The full model's cost is split over the stages by their times alone
    (:class:`~dgconvert.bench.systems.StageProbe`)."""
    k = bundle.num_gates
    size = _batch_size(images, batch_size, "the gates")
    x = images[: max(size, min(len(images), 256 if size < 64 else 4 * size)) // size * size]
    batches = [x[s:s + size] for s in range(0, len(x), size)]
    never = 3.0e38  # on (head and compaction run) but no score reaches it
    inf = float("inf")
    configs = {"on": [never] * k, "off": [inf] * k,
               **{j: [inf if i == j else never for i in range(k)] for j in range(k)}}
    runner = GatedRunner(bundle, backend=backend, max_batch=size, **backend_options)
    clock = time.perf_counter
    seconds: dict[Any, list[float]] = {c: [] for c in configs}
    try:
        for rnd in range(repeats + 1):
            for name, t in configs.items():
                runner.thresholds = t
                runner.predict(batches[0])  # builds the variant without the off gates
                t0 = clock()
                for xb in batches:
                    runner.predict(xb)
                if rnd:
                    seconds[name].append((clock() - t0) * 1000.0 / len(x))
                if name == "off":  # its session may spin: let it go idle before the next
                    time.sleep(SETTLE_S)
        per_stage = np.array(latency_exit_costs(bundle, images, backend=backend,
                                                batch_size=size, repeats=2, **backend_options))
    finally:
        runner.close()
    on = np.array(seconds["on"])
    gate = [max(0.0, float(np.median(on - np.array(seconds[j])))) for j in range(k)]
    stage_ms = np.diff(per_stage, prepend=0.0)
    body = float(np.median(seconds["off"])) * stage_ms / stage_ms.sum()
    return GateCosts(tuple(float(v) for v in body), tuple(gate), size)


def measure_rows(
    bundle: Bundle,
    images: np.ndarray,
    result: CalibrationResult,
    batch_size: int,
    backend: str,
    **backend_options: Any,
) -> dict[str, float]:
    """Measured ms/image of the full model and of each row's thresholds on the backend:
    one interleaved run of :func:`dgconvert.bench.run_benchmark` (same timing as ``bench``)."""
    x = images[:2048]
    if len(x) == 0:
        raise BenchError("--measure needs at least one image; got none")
    size = min(batch_size, len(x))
    rows = {name: list(getattr(result, name).thresholds) for name in MEASURE_ROWS}
    config = BenchConfig(batch_sizes=[size], repeats=3, warmup=1, samples=len(x), progress=False)
    rep = run_benchmark(bundle, x, config=config, backend=backend, operating_points=rows,
                        backend_options=backend_options)
    ms = {"full": rep.result("full", size).ms.median}
    ms.update({name: rep.result(f"gated[{name}]", size).ms.median for name in rows})
    return ms
