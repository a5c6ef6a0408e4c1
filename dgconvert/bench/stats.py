"""The arithmetic of a benchmark: spreads, cost shares, ideal times and efficiency.

Pure numpy, no timing: everything here is tested on known inputs.

- ``rows_reached[k]``: rows that stage ``k`` processed (``n`` for stage 0, then those that
  did not exit before ``k``); ``exit_histogram[k] = rows_reached[k] - rows_reached[k + 1]``.
- FLOPs cost share: ``sum_k hist[k] * exit_costs[k] / (n * full_flops)``, the fraction of the
  full model's FLOPs the gated model pays on average (gates included).
- Time cost share: ``sum_k rows_reached[k] * t[k] / (n * sum_k t[k])`` where ``t[k]`` is stage
  ``k``'s measured time per image when it runs alone on full batches.
- ``ideal = full time * cost share``; ``efficiency = ideal / measured`` (1.0: the gated runtime
  costs exactly its share of the full model, no staging overhead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.core.exits import ExitRule


@dataclass(frozen=True)
class Spread:
    """Summary of repeated measurements (same unit as the inputs)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @property
    def relative(self) -> float:
        """Half the min-max range relative to the median (0.03 = ±3 %)."""
        return (self.max - self.min) / (2 * self.median) if self.median > 0 else 0.0

    def scaled(self, factor: float) -> Spread:
        return Spread(*(v * factor for v in (self.median, self.min, self.max, self.q1, self.q3)),
                      n=self.n)


def summarize(values: Sequence[float]) -> Spread:
    """Median, min, max and quartiles of repeated measurements."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise BenchError("no measurements to summarize; expected at least one repeat (--repeats >= 1)")
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return Spread(float(med), float(v.min()), float(v.max()), float(q1), float(q3), int(v.size))


def histogram_from_rows(rows_reached: Sequence[int]) -> list[int]:
    """Exits per stage from rows reached per stage (the last stage keeps all it got)."""
    r = [int(x) for x in rows_reached]
    if any(b > a for a, b in zip(r, r[1:], strict=False)) or any(x < 0 for x in r):
        raise BenchError(f"rows reached per stage must be non-increasing and >= 0, got {r}")
    return [a - b for a, b in zip(r, r[1:], strict=False)] + r[-1:]


def rows_from_histogram(histogram: Sequence[int]) -> list[int]:
    """Rows reached per stage from exits per stage."""
    return [int(v) for v in ExitRule.reach(np.asarray([int(x) for x in histogram], np.int64))]


def cost_share_flops(histogram: Sequence[int], exit_costs: Sequence[float], full_flops: float) -> float:
    """Average FLOPs paid per sample over the full model's FLOPs."""
    h = np.asarray(histogram, dtype=np.float64)
    c = np.asarray(exit_costs, dtype=np.float64)
    if h.shape != c.shape:
        raise BenchError(
            f"exit histogram has {h.size} entries but exit_costs has {c.size}; expected one per stage"
        )
    n = h.sum()
    if n <= 0 or full_flops <= 0:
        raise BenchError(f"need samples and full_flops > 0, got n={n}, full_flops={full_flops}")
    return float((h * c).sum() / (n * float(full_flops)))


def cost_share_time(rows_reached: Sequence[int], stage_times: Sequence[float]) -> float:
    """Share of the stage chain's time paid when stage k processes ``rows_reached[k]`` rows.

    ``stage_times[k]`` is stage k's time per image on full batches (any unit).
    """
    r = np.asarray(rows_reached, dtype=np.float64)
    t = np.asarray(stage_times, dtype=np.float64)
    if r.shape != t.shape:
        raise BenchError(
            f"got rows for {r.size} stages but times for {t.size}; expected one per stage"
        )
    if r.size == 0 or r[0] <= 0 or t.sum() <= 0:
        raise BenchError(f"need rows_reached[0] > 0 and positive stage times, got {r}, {t}")
    return float((r * t).sum() / (r[0] * t.sum()))


def ideal_time(full_time: float, share: float) -> float:
    """What the gated model would cost with zero staging overhead."""
    return float(full_time) * float(share)


def efficiency(full_time: float, share: float, measured: float) -> float:
    """``ideal / measured``; 1.0 means the gated runtime reaches its cost share exactly."""
    if measured <= 0:
        raise BenchError(f"measured time must be > 0, got {measured}")
    return ideal_time(full_time, share) / float(measured)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Ratios of measurements taken in the same repeat (drift cancels), summarized."""
    a = np.asarray(numerators, dtype=np.float64)
    b = np.asarray(denominators, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise BenchError(f"need equally many paired measurements, got {a.size} and {b.size}")
    return summarize(a / b)
