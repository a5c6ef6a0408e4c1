"""Default mode: select along the frontier on samples the search never saw, and estimate
on samples the selection never saw.

Selection (:func:`walk_frontier`). The path along the frontier (fitted on the search part,
:func:`dgconvert.calibrate.frontier.selection_path`: from the full model to the cheapest
vector) is walked on the selection part; the walk stops at the first vector whose paired
drop below the full model plus a small margin (in standard errors of that drop; or whose
accuracy minus the margin, for an absolute target) misses the target there, and the
cheapest vector that passed is chosen. Stopping at the first failure limits the winner's
curse of picking the cheapest of many noisy estimates; the margin removes what is left of
it (measured in benchmarks/results/calibration_sim.md). The all-off vector is the full
model (drop 0): it always passes.

Estimate (:func:`estimate`). The chosen vector is evaluated on the held-out part, which
neither the search nor the selection used: accuracy, paired drop below the full model
(d_i = loss_i - fix_i) and cost per sample, each with a two-sided 90 % interval (Wilson
for the accuracy, normal approximation for the means).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.exits import ExitRule, GateRecords, simulate

log = logging.getLogger(__name__)

Z90 = 1.6448536269514722  # two-sided 90 % normal quantile


def is_full(thresholds: Sequence[float]) -> bool:
    """Every gate off: the full model."""
    return ExitRule.from_thresholds(thresholds, np.float64).never_exits


@dataclass(frozen=True)
class Walk:
    """Where the walk along the frontier stopped."""

    thresholds: tuple[float, ...]
    selected: int  # position in the family; -1: the full model (nothing passed)
    passed: int  # how many leading vectors passed
    fallback: bool  # nothing passed


def walk_frontier(
    records: GateRecords,
    y: np.ndarray,
    family: Sequence[Sequence[float]],
    exit_costs: Sequence[float] | np.ndarray,
    *,
    target: float,
    max_drop: float | None = None,
    margin: float = 0.0,
) -> Walk:
    """Walk ``family`` (most accurate first) on these samples; see the module doc.

    With ``max_drop`` a vector passes when its paired drop here plus ``margin`` standard
    errors is at most ``max_drop``; otherwise when its accuracy here minus ``margin``
    standard errors is at least ``target``. When nothing passes, the full model is chosen
    (``max_drop``) or the first, most accurate vector (``target``).
    """
    k = records.num_gates
    full_right = records.final_labels == y
    outs = []
    for t in family:
        out = simulate(records, y, t, exit_costs)
        if is_full(t):
            ok = True if max_drop is not None else bool(full_right.mean() >= target - 1e-12)
        else:
            right = out.result.labels == y
            n = records.n
            if max_drop is not None:
                d = full_right.astype(np.int64) - right.astype(np.int64)
                se = float(d.std()) / math.sqrt(n)
                ok = float(d.mean()) + margin * se <= max_drop + 1e-12
            else:
                acc = out.correct / n
                ok = acc - margin * math.sqrt(acc * (1 - acc) / n) >= target - 1e-12
        if not ok:
            break
        outs.append(out)
    if not outs:
        if max_drop is not None:
            log.warning("no frontier vector keeps the drop on the selection part: full model")
            return Walk((math.inf,) * k, -1, 0, True)
        log.warning("the most accurate frontier vector misses the target on the selection part")
        return Walk(tuple(float(v) for v in family[0]), 0, 0, True)
    j = min(range(len(outs)), key=lambda i: (outs[i].cost, -outs[i].correct))
    chosen = tuple(float(v) for v in family[j])
    if is_full(chosen):
        log.warning("no gated frontier vector keeps the target on the selection part: full model")
    return Walk(chosen, j, len(outs), is_full(chosen))


def _wilson(successes: int, n: int) -> tuple[float, float]:
    p = successes / n
    den = 1 + Z90**2 / n
    mid = (p + Z90**2 / (2 * n)) / den
    half = Z90 * math.sqrt(p * (1 - p) / n + Z90**2 / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _mean_interval(x: np.ndarray) -> tuple[float, float, float]:
    n = x.size
    m = float(x.mean())
    se = float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return m, m - Z90 * se, m + Z90 * se


@dataclass(frozen=True)
class Estimate:
    """Expected behaviour on unseen data of one vector, from samples it was not chosen on."""

    n: int
    accuracy: float
    accuracy_interval: tuple[float, float]
    drop: float  # paired: full-model accuracy minus this vector's, on the same samples
    drop_interval: tuple[float, float]
    cost: float  # mean cost per sample (exit-cost units)
    cost_interval: tuple[float, float]
    cost_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_interval90": list(self.accuracy_interval),
            "drop": self.drop,
            "drop_interval90": list(self.drop_interval),
            "cost": self.cost,
            "cost_interval90": list(self.cost_interval),
            "cost_fraction": self.cost_fraction,
        }


def estimate(
    records: GateRecords,
    y: np.ndarray,
    thresholds: Sequence[float],
    exit_costs: Sequence[float] | np.ndarray,
) -> Estimate | None:
    """:class:`Estimate` of ``thresholds`` on these samples (None when there are none)."""
    if records.n == 0:
        return None
    out = simulate(records, y, thresholds, exit_costs)
    costs = np.asarray(exit_costs, np.float64)
    d = (records.final_labels == y).astype(np.int64) - (out.result.labels == y).astype(np.int64)
    drop, d_lo, d_hi = _mean_interval(d.astype(np.float64))
    cost, c_lo, c_hi = _mean_interval(costs[out.result.exit_stage])
    return Estimate(
        n=records.n,
        accuracy=out.accuracy,
        accuracy_interval=_wilson(out.correct, records.n),
        drop=drop,
        drop_interval=(d_lo, d_hi),
        cost=cost,
        cost_interval=(c_lo, c_hi),
        cost_fraction=out.cost_fraction,
    )
