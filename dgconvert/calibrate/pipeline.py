"""``calibrate``: split, search, optional guarantee, comparisons and held-out evaluation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from dgconvert.calibrate.baselines import sequential_index
from dgconvert.calibrate.bounds import check_confidence, fixed_sequence_test, split_indices
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.frontier import calibration_frontier
from dgconvert.calibrate.problem import Problem, Solution, required_correct
from dgconvert.calibrate.report import (
    CalibrationResult,
    FrontierPoint,
    OperatingPoint,
    SplitStats,
)
from dgconvert.calibrate.search import check_target, shared_value, solve
from dgconvert.core.exits import (
    GateRecords,
    as_records,
    check_exit_costs,
    check_ground_truth,
    simulate,
)


def _target(full: float, target_acc: float | None, max_drop: float | None) -> float:
    if (target_acc is None) == (max_drop is None):
        raise CalibrationError("give exactly one of target_acc (fraction) or max_drop (fraction)")
    if target_acc is not None:
        return check_target(target_acc)
    drop = float(max_drop)
    if not 0.0 <= drop <= 1.0:
        raise CalibrationError(
            f"max_drop must be a fraction in [0, 1] (0.01 = one point), got {max_drop!r}"
        )
    return max(full - drop, 0.0)


class _Evaluator:
    """Evaluates threshold vectors on the calibration and held-out splits."""

    def __init__(
        self,
        rec: GateRecords,
        y: np.ndarray,
        costs: np.ndarray,
        cal: np.ndarray,
        held: np.ndarray,
        target: float,
    ) -> None:
        self.parts = (rec.subset(cal), y[cal]), (rec.subset(held), y[held])
        self.costs = costs
        self.need = required_correct(target, cal.size)

    def point(self, name: str, thresholds: Sequence[float]) -> OperatingPoint:
        (rc, yc), (rh, yh) = self.parts
        cal = simulate(rc, yc, thresholds, self.costs)
        held = SplitStats.of(simulate(rh, yh, thresholds, self.costs)) if rh.n else None
        t = tuple(float(v) for v in thresholds)
        return OperatingPoint(name, t, cal.correct >= self.need, SplitStats.of(cal), held)


def calibrate(
    records: Any,
    y: Any,
    exit_costs: Sequence[float] | np.ndarray,
    *,
    target_acc: float | None = None,
    max_drop: float | None = None,
    confidence: float | None = None,
    holdout: float = 0.3,
    seed: int = 0,
    num_classes: int | None = None,
    cost_unit: str = "flops",
    method: str = "auto",
    frontier_points: int = 24,
) -> CalibrationResult:
    """Choose gate thresholds: cheapest expected cost with accuracy >= target.

    ``target_acc`` is an absolute accuracy, ``max_drop`` a drop below the full model's
    accuracy on the calibration split; both are fractions (0.947, 0.01 = one point). A
    seeded split keeps ``holdout`` of the samples aside; the search runs on the rest and
    every row is also reported on the held-out part. With ``confidence`` (e.g. 0.95) the
    thresholds are instead the cheapest the held-out part certifies by fixed-sequence
    Clopper-Pearson testing of the calibration frontier (:mod:`bounds`); the held-out
    figures are then those of the test itself. ``cost_unit``: ``"flops"``, ``"ms"`` or any
    label. Raises :class:`CalibrationError` on inconsistent inputs or an unreachable
    (or uncertifiable) target.
    """
    start = time.perf_counter()
    rec = as_records(records)
    y = check_ground_truth(rec, y, num_classes)
    costs = check_exit_costs(rec, exit_costs)
    conf = None if confidence is None else check_confidence(confidence)
    cal_idx, held_idx = split_indices(rec.n, holdout, seed)
    if conf is not None and held_idx.size == 0:
        raise CalibrationError("confidence needs held-out samples to test on: use holdout > 0")
    if cal_idx.size == 0:
        raise CalibrationError("no calibration samples: the records are empty")
    prob = Problem.build(rec.subset(cal_idx), y[cal_idx], costs)
    full = prob.evaluate([0] * prob.num_gates)
    target = _target(full.correct / prob.n, target_acc, max_drop)
    sol, exact = solve(prob, target, method)
    need = required_correct(target, prob.n)
    seq = sequential_index(prob, need)
    shared_t = shared_value(prob, target)
    shared = prob.evaluate(prob.to_index([shared_t] * prob.num_gates))
    fronts: list[Solution] = []
    if frontier_points > 0 or conf is not None:
        fronts = calibration_frontier(
            prob, [sol, seq, shared, full], target, max(frontier_points, 16)
        )
    ev = _Evaluator(rec, y, costs, cal_idx, held_idx, target)
    search_point = ev.point("search", prob.to_thresholds(sol.idx))
    bound = None
    ours = replace(search_point, name="ours")  # without a bound: the search's own vector
    if conf is not None:
        family = [prob.to_thresholds(s.idx) for s in fronts]
        held_rec, held_y = ev.parts[1]
        bound = fixed_sequence_test(
            held_rec, held_y, family, costs, target=target, confidence=conf, max_drop=max_drop
        )
        ours = ev.point("ours", bound.thresholds)
    kind = "exact" if exact else "heuristic"
    return CalibrationResult(
        ours=ours,
        full=ev.point("full", [np.inf] * prob.num_gates),
        sequential=ev.point("sequential", prob.to_thresholds(seq.idx)),
        shared=ev.point("shared", [shared_t] * prob.num_gates),
        search=search_point,
        target_accuracy=target,
        method=kind if conf is None else f"ltt+{kind}",
        exit_costs=tuple(float(c) for c in costs),
        cost_unit=cost_unit,
        confidence=conf,
        bound=bound,
        frontier=tuple(
            FrontierPoint(
                prob.to_thresholds(s.idx), s.correct / prob.n, s.cost / prob.n / float(costs[-1])
            )
            for s in fronts
        ),
        holdout=holdout,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
