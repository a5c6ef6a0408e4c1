"""Threshold search: minimise the expected cost subject to accuracy >= target.

Problem. Gate k lets a sample exit when its score reaches ``t[k]``; only the order of a
threshold among the gate's distinct scores matters, so each gate has D_k + 1 choices
(every distinct score, and +inf = off). Cost falls as any threshold falls, accuracy need
not move monotonically, and gates interact (a gate only sees what earlier gates kept).

Algorithm (:func:`search`).

1. Starting points, all exact for their own family: the full model (all off), the d-gate
   paper's sequential rule, the best single shared threshold, and the best common
   exit-rate level (every gate at the same quantile of its scores). If none reaches the
   target, the most accurate vector found by the same machinery in maximise-accuracy
   mode is the start, or the target is reported unreachable.
2. Local search (:mod:`local`) from every start: exact coordinate moves (one gate over
   all its distinct scores, via ``bincount`` + cumulative sums over samples ranked per
   gate once) and joint two-gate moves on 2-D value tables over candidate grids (score
   quantiles plus geometric steps around the current value), accepting only strict
   improvements; the best result is then polished with finer pair grids (also every
   index within a window of the current one).
3. Exact regime (K <= 3 and n <= 2,000, or small enough; ``method="exact"`` forces it):
   branch and bound (:mod:`exact`) over all distinct scores per gate, seeded with the best
   local solution, pruning candidates a lower threshold dominates (gate right on every
   newly exiting sample) and subtrees whose oracle accuracy misses the target or whose
   cost lower bound exceeds the incumbent. The result equals exhaustive enumeration
   (:func:`brute_force_search`).
   Large regime: the same branch and bound restricted to per-gate quantile grids (a global
   coarse optimum; 32 values per gate for K = 4) is one more start for step 2.

Timing: benchmarks/search_speed.py.

Because every start is kept in the race and moves only improve, the result is never worse
than the sequential or shared choice on the calibration data. Accuracy targets are
fractions in [0, 1]; ties in cost go to the more accurate vector.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.calibrate.baselines import (
    brute_force_index,
    level_index,
    sequential_index,
    shared_threshold,
)
from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.exact import solve_exact
from dgconvert.calibrate.local import LocalSearch, quantile_grid
from dgconvert.calibrate.problem import Goal, Problem, Solution, required_correct
from dgconvert.core.exits import (
    GateRecords,
    Outcome,
    as_records,
    check_exit_costs,
    check_ground_truth,
    simulate,
)

EXACT_MAX_GATES = 3
EXACT_MAX_SAMPLES = 2_000
EXACT_MAX_CELLS = 50_000_000
_GRID_WORK = 100_000_000  # samples x branch nodes of the grid search
_GRID_CELLS = 32**4  # table cells of the grid search (K = 4: 32 per gate)
_METHODS = ("auto", "exact", "heuristic")


@dataclass(frozen=True)
class Candidate:
    """One threshold vector and how it does on the data it was chosen on."""

    method: str
    thresholds: tuple[float, ...]
    outcome: Outcome
    feasible: bool  # accuracy >= target on that data


@dataclass(frozen=True)
class SearchResult:
    """The search's choice and the reference choices on the same data."""

    best: Candidate
    sequential: Candidate
    shared: Candidate
    full: Candidate
    target_accuracy: float
    exact: bool
    seconds: float


def check_target(target_accuracy: float) -> float:
    """A target accuracy as a fraction in [0, 1]; a clear error for a percentage."""
    t = float(target_accuracy)
    if not 0.0 <= t <= 1.0:
        raise CalibrationError(
            f"target_accuracy={target_accuracy!r}; expected a fraction in [0, 1] (0.947 for "
            "94.7 %). The Python API takes fractions, the CLI's --target-acc percent. Fix: "
            "for a percentage, divide by 100."
        )
    return t


def use_exact(prob: Problem, method: str) -> bool:
    """Whether ``method`` means the exact branch and bound on this problem."""
    if method not in _METHODS:
        raise CalibrationError(f"method must be one of {_METHODS}, got {method!r}")
    if method != "auto":
        return method == "exact"
    small = prob.num_gates <= EXACT_MAX_GATES and prob.n <= EXACT_MAX_SAMPLES
    return small or float(np.prod([d + 1.0 for d in prob.sizes])) <= EXACT_MAX_CELLS


def _grid_exact(prob: Problem, goal: Goal, incumbent: Solution | None) -> Solution | None:
    k = prob.num_gates
    size = min(1024, int(_GRID_CELLS ** (1.0 / k) + 1e-6))
    if k > 2:
        size = min(size, int((_GRID_WORK / prob.n) ** (1.0 / (k - 2)) + 1e-6))
    if size < 4:
        return None
    grids = [quantile_grid(prob, g, size) for g in range(k)]
    return solve_exact(prob, goal, incumbent, grids)


def _race(
    prob: Problem, goal: Goal, starts: Sequence[Solution | None], exact: bool
) -> Solution | None:
    """Local search from every feasible start; the exact solver (or its grid version) on top."""
    local = LocalSearch(prob)
    pool = {s.idx: s for s in starts if s is not None and goal.feasible(s.correct)}
    best: Solution | None = None
    for s in pool.values():
        if goal.better(s, best):
            best = s
    if not exact:
        coarse = _grid_exact(prob, goal, best)
        if coarse is not None:
            pool.setdefault(coarse.idx, coarse)
    coarse_best: Solution | None = None
    for s in pool.values():
        found = local.run(goal, s, fine=False)
        if goal.better(found, coarse_best):
            coarse_best = found
    if coarse_best is not None:
        best = local.run(goal, coarse_best)
    return solve_exact(prob, goal, best) if exact else best


def best_accuracy(prob: Problem, method: str = "auto") -> tuple[Solution, bool]:
    """Most accurate index vector (exact when ``use_exact``) and whether it is exact."""
    goal = Goal(None)
    exact = use_exact(prob, method)
    starts = [prob.evaluate([0] * prob.num_gates), level_index(prob, goal)]
    t = shared_threshold(prob, goal)
    if t is not None:
        starts.append(prob.evaluate(prob.to_index([t] * prob.num_gates)))
    best = _race(prob, goal, starts, exact)
    assert best is not None  # the all-off start is always feasible here
    return best, exact


def unreachable(prob: Problem, target: float, top: Solution, exact: bool) -> CalibrationError:
    """The error for a target no thresholds reach, with the full and best accuracy."""
    full = prob.evaluate([0] * prob.num_gates).correct / prob.n
    how = "the maximum over all thresholds" if exact else "the best the search found"
    return CalibrationError(
        f"target accuracy {target:.4%} is unreachable on the {prob.n} calibration samples: the "
        f"full model reaches {full:.4%} and the best reachable accuracy is "
        f"{top.correct / prob.n:.4%} ({how}). Lower the target (or use max_drop)."
    )


def solve(prob: Problem, target: float, method: str = "auto") -> tuple[Solution, bool]:
    """Cheapest index vector with accuracy >= ``target``, and whether it is exact."""
    need = required_correct(target, prob.n)
    goal = Goal(need)
    exact = use_exact(prob, method)
    starts: list[Solution | None] = [
        prob.evaluate([0] * prob.num_gates),
        sequential_index(prob, need),
        level_index(prob, goal),
    ]
    t = shared_threshold(prob, goal)
    if t is not None:
        starts.append(prob.evaluate(prob.to_index([t] * prob.num_gates)))
    if not any(s is not None and goal.feasible(s.correct) for s in starts):
        top, top_exact = best_accuracy(prob, method)
        if not goal.feasible(top.correct):
            raise unreachable(prob, target, top, top_exact)
        starts.append(top)
    best = _race(prob, goal, starts, exact)
    assert best is not None  # a feasible start was in the race
    return best, exact


def _inputs(
    records: Any, y: Any, exit_costs: Any
) -> tuple[GateRecords, np.ndarray, np.ndarray, Problem]:
    rec = as_records(records)
    if rec.n == 0:
        raise CalibrationError("no calibration samples: the records are empty")
    y = check_ground_truth(rec, y)
    costs = check_exit_costs(rec, exit_costs)
    return rec, y, costs, Problem.build(rec, y, costs)


def candidate(
    name: str,
    records: GateRecords,
    y: np.ndarray,
    exit_costs: np.ndarray,
    thresholds: Sequence[float],
    target: float,
) -> Candidate:
    """A :class:`Candidate` evaluated with :func:`simulate`."""
    out = simulate(records, y, thresholds, exit_costs)
    ok = out.correct >= required_correct(target, records.n)
    return Candidate(name, tuple(float(t) for t in thresholds), out, bool(ok))


def shared_value(prob: Problem, target: float) -> float:
    """The cheapest shared threshold meeting ``target``; if none does, the most accurate."""
    t = shared_threshold(prob, Goal(required_correct(target, prob.n)))
    if t is None:
        t = shared_threshold(prob, Goal(None))
    assert t is not None  # some candidate is always the most accurate
    return t


def sequential_search(records: Any, y: Any, exit_costs: Any, *, target_accuracy: float) -> Candidate:
    """The d-gate paper's sequential thresholds (earliest gate first, each the lowest that
    keeps the target); ``feasible`` is False when even that misses the target."""
    target = check_target(target_accuracy)
    rec, y, costs, prob = _inputs(records, y, exit_costs)
    sol = sequential_index(prob, required_correct(target, prob.n))
    return candidate("sequential", rec, y, costs, prob.to_thresholds(sol.idx), target)


def shared_search(records: Any, y: Any, exit_costs: Any, *, target_accuracy: float) -> Candidate:
    """One threshold for every gate, the cheapest meeting the target; if none does, the
    most accurate one (``feasible`` False)."""
    target = check_target(target_accuracy)
    rec, y, costs, prob = _inputs(records, y, exit_costs)
    return candidate("shared", rec, y, costs, [shared_value(prob, target)] * prob.num_gates, target)


def brute_force_search(records: Any, y: Any, exit_costs: Any, *, target_accuracy: float) -> Candidate:
    """Exhaustive optimum over all distinct scores (+inf) per gate; small problems only
    (``prod(D_k + 1) * n * K`` work). Raises :class:`CalibrationError` if unreachable."""
    target = check_target(target_accuracy)
    rec, y, costs, prob = _inputs(records, y, exit_costs)
    sol = brute_force_index(prob, Goal(required_correct(target, prob.n)))
    if sol is None:
        top = brute_force_index(prob, Goal(None))
        assert top is not None
        raise unreachable(prob, target, top, True)
    return candidate("brute-force", rec, y, costs, prob.to_thresholds(sol.idx), target)


def search(
    records: Any, y: Any, exit_costs: Any, *, target_accuracy: float, method: str = "auto"
) -> SearchResult:
    """Cheapest thresholds with accuracy >= ``target_accuracy`` (a fraction) on these samples,
    with the sequential, shared and full-model choices for comparison.

    ``method``: ``"auto"`` (exact when K <= 3 and n <= 2,000 or the problem is small),
    ``"exact"`` (always branch and bound) or ``"heuristic"``. Raises
    :class:`CalibrationError` when no thresholds reach the target.
    """
    start = time.perf_counter()
    target = check_target(target_accuracy)
    rec, y, costs, prob = _inputs(records, y, exit_costs)
    sol, exact = solve(prob, target, method)
    k = prob.num_gates
    seq = sequential_index(prob, required_correct(target, prob.n))
    return SearchResult(
        best=candidate(
            "exact" if exact else "heuristic", rec, y, costs, prob.to_thresholds(sol.idx), target
        ),
        sequential=candidate("sequential", rec, y, costs, prob.to_thresholds(seq.idx), target),
        shared=candidate("shared", rec, y, costs, [shared_value(prob, target)] * k, target),
        full=candidate("full", rec, y, costs, [np.inf] * k, target),
        target_accuracy=target,
        exact=exact,
        seconds=time.perf_counter() - start,
    )
