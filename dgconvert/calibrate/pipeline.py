"""``calibrate``, the public entry point: split, search, selection along the frontier (or a
guarantee), comparisons and the held-out estimate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgconvert.calibrate.baselines import sequential_index
from dgconvert.calibrate.bounds import check_confidence, fixed_sequence_test, split_indices
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.frontier import calibration_frontier, selection_path
from dgconvert.calibrate.problem import Problem, required_correct
from dgconvert.calibrate.report import (
    CalibrationResult,
    FrontierPoint,
    OperatingPoint,
    SplitStats,
)
from dgconvert.calibrate.search import check_target, shared_value, solve
from dgconvert.calibrate.selection import estimate, walk_frontier
from dgconvert.core.exits import (
    GateRecords,
    as_records,
    check_exit_costs,
    check_ground_truth,
    simulate,
)

SELECT_MARGIN = 0.25  # default mode: standard errors of the paired drop kept below the target
FAMILY_POINTS = 48  # least frontier targets: the family walked or tested (denser near the target)
DEFAULT_HOLDOUT = 0.3  # default mode: the share held out for the unseen-data estimate
CONFIDENCE_HOLDOUT = 0.5  # with a confidence: the share held out for the test


def _target(full: float, target_accuracy: float | None, max_drop: float | None) -> float:
    if (target_accuracy is None) == (max_drop is None):
        raise CalibrationError(
            "give exactly one of target_accuracy (fraction) or max_drop (fraction)"
        )
    if target_accuracy is not None:
        return check_target(target_accuracy)
    drop = float(max_drop)
    if not 0.0 <= drop <= 1.0:
        raise CalibrationError(
            f"max_drop={max_drop!r}; expected a fraction in [0, 1] (0.01 = one point). The "
            "Python API takes fractions, the CLI's --max-drop points. Fix: for points, divide "
            "by 100."
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


def promise(target: float, max_drop: float | None, confidence: float | None) -> str:
    """One sentence: what the chosen thresholds promise about unseen data."""
    what = (
        f"accuracy at most {100 * max_drop:.3g} points below the full model's"
        if max_drop is not None
        else f"accuracy at least {target:.2%}"
    )
    if confidence is None:
        return (
            f"expected: on average over calibration draws, unseen data sees {what} "
            "(selected on samples the search did not use; estimate on samples neither used)"
        )
    return (
        f"guarantee: with probability >= {confidence:g} over the calibration data, unseen data "
        f"sees {what} (fixed-sequence test on samples the search did not use)"
    )


def calibrate(
    records: Any,
    y: Any,
    exit_costs: Sequence[float] | np.ndarray,
    *,
    target_accuracy: float | None = None,
    max_drop: float | None = None,
    confidence: float | None = None,
    holdout: float | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    cost_unit: str = "flops",
    method: str = "auto",
    frontier_points: int = 24,
    search_share: float = 0.5,
    select_margin: float = SELECT_MARGIN,
) -> CalibrationResult:
    """Choose gate thresholds: cheapest expected cost with accuracy >= target on new data.

    ``target_accuracy`` is an absolute accuracy, ``max_drop`` a drop below the full model's
    accuracy; both are fractions (0.947, 0.01 = one point). A seeded split keeps ``holdout``
    of the samples aside (default: ``DEFAULT_HOLDOUT``, with a confidence
    ``CONFIDENCE_HOLDOUT``). Default mode: the rest is split again (``search_share`` for the
    search); the accuracy-vs-cost frontier is searched on one part and walked on the other
    (:mod:`selection`), and the held-out part estimates the chosen vector's unseen accuracy,
    drop and cost with 90 % intervals. With ``confidence`` (e.g. 0.9) the frontier is
    searched on the rest and tested in fixed sequence on the held-out part (:mod:`bounds`);
    with ``max_drop``, when nothing is certified, the full model is returned (``fallback``).
    ``cost_unit``: ``"flops"``, ``"ms"`` or any label. Raises :class:`CalibrationError` on
    inconsistent inputs or a target the search data cannot reach.
    """
    start = time.perf_counter()
    rec = as_records(records)
    y = check_ground_truth(rec, y, num_classes)
    costs = check_exit_costs(rec, exit_costs)
    conf = None if confidence is None else check_confidence(confidence)
    if holdout is None:
        holdout = DEFAULT_HOLDOUT if conf is None else CONFIDENCE_HOLDOUT
    cal_idx, held_idx = split_indices(rec.n, holdout, seed)
    if conf is not None and held_idx.size == 0:
        raise CalibrationError("confidence needs held-out samples to test on: use holdout > 0")
    if cal_idx.size == 0:
        raise CalibrationError("no calibration samples: the records are empty")
    full_cal = float(np.mean(rec.final_labels[cal_idx] == y[cal_idx]))
    target = _target(full_cal, target_accuracy, max_drop)
    drop = None if max_drop is None else float(max_drop)
    if conf is None:
        if not 0.0 < search_share < 1.0:
            raise CalibrationError(f"search_share must be in (0, 1), got {search_share!r}")
        if cal_idx.size < 2:
            raise CalibrationError(
                f"{cal_idx.size} calibration sample(s) cannot be split into a search and a "
                "selection part; give more labelled samples"
            )
        sel_pos, search_pos = split_indices(cal_idx.size, search_share, seed + 1)
        search_idx, select_idx = cal_idx[search_pos], cal_idx[sel_pos]
    else:
        search_idx, select_idx = cal_idx, held_idx
    prob = Problem.build(rec.subset(search_idx), y[search_idx], costs)
    full = prob.evaluate([0] * prob.num_gates)
    target_s = target if drop is None else max(full.correct / prob.n - drop, 0.0)
    sol, exact = solve(prob, target_s, method)
    need = required_correct(target_s, prob.n)
    seq = sequential_index(prob, need)
    shared_t = shared_value(prob, target_s)
    shared = prob.evaluate(prob.to_index([shared_t] * prob.num_gates))
    fronts = calibration_frontier(
        prob, [sol, seq, shared, full], target_s, max(frontier_points, FAMILY_POINTS)
    )
    family = [prob.to_thresholds(s.idx) for s in selection_path(prob, fronts)]
    ev = _Evaluator(rec, y, costs, cal_idx, held_idx, target)
    search_point = ev.point("search", prob.to_thresholds(sol.idx))
    sel_rec, sel_y = rec.subset(select_idx), y[select_idx]
    bound = None
    kind = "exact" if exact else "heuristic"
    if conf is None:
        walk = walk_frontier(sel_rec, sel_y, family, costs, target=target, max_drop=drop,
                             margin=select_margin)
        chosen, fallback = walk.thresholds, walk.fallback
        selection = {"rule": "frontier walk, stop at first failure", "family_size": len(family),
                     "passed": walk.passed, "selected": walk.selected,
                     "margin_se": select_margin}
        expected = estimate(rec.subset(held_idx), y[held_idx], chosen, costs)
        method_name = f"frontier-walk+{kind}"
    else:
        bound = fixed_sequence_test(
            sel_rec, sel_y, family, costs, target=target, confidence=conf, max_drop=drop
        )
        chosen, fallback = bound.thresholds, bound.fallback
        selection = {"rule": "fixed-sequence test, stop at first failure",
                     "family_size": len(family), "passed": bound.rejected,
                     "selected": bound.selected}
        expected = None
        method_name = f"ltt+{kind}"
    selection.update(n_search=int(search_idx.size), n_select=int(select_idx.size),
                     n_estimate=0 if expected is None else expected.n, fallback=fallback)
    return CalibrationResult(
        ours=ev.point("ours", chosen),
        full=ev.point("full", [np.inf] * prob.num_gates),
        sequential=ev.point("sequential", prob.to_thresholds(seq.idx)),
        shared=ev.point("shared", [shared_t] * prob.num_gates),
        search=search_point,
        target_accuracy=target,
        method=method_name,
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
        max_drop=drop,
        expected=expected,
        promise=promise(target, drop, conf),
        selection=selection,
        family=tuple(tuple(float(v) for v in t) for t in family),
    )
