"""The accuracy-vs-cost frontier on calibration data.

Targets are swept from the most accurate vector found downwards; each point is a short
local search's cheapest vector for its target (coordinate moves, pair moves of neighbouring
gates), warm-started from the previous point, which stays feasible as targets fall.
Points dominated by another (no more accurate and no cheaper) are dropped, so the list
runs from most accurate/most expensive to cheapest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dgconvert.calibrate.local import LocalSearch
from dgconvert.calibrate.problem import Goal, Problem, Solution, required_correct


def pareto(solutions: Sequence[Solution]) -> list[Solution]:
    """Non-dominated solutions, most accurate first (strictly falling cost and accuracy)."""
    out: list[Solution] = []
    for s in sorted(solutions, key=lambda s: (s.cost, -s.correct)):
        if not out or s.correct > out[-1].correct:
            out.append(s)
    return out[::-1]


def frontier_targets(low: float, high: float, target: float | None, points: int) -> np.ndarray:
    """Descending accuracy targets: a quarter evenly spread over [low, high], the rest within
    1.5 points of ``target`` (where a walk or a test on other samples chooses)."""
    if points <= 0:
        return np.zeros(0)
    spread = np.linspace(low, high, max(points // 4, 2))
    near = np.zeros(0)
    if target is not None:
        near = np.clip(target + np.linspace(-0.015, 0.015, points - len(spread)), low, high)
    return np.unique(np.concatenate([spread, near, [high]]))[::-1]


def frontier(prob: Problem, top: Solution, targets: Sequence[float]) -> list[Solution]:
    """Pareto points of the warm-started searches for each target (``top``: most accurate)."""
    local = LocalSearch(prob)
    cheapest = prob.evaluate(list(prob.sizes))
    found = [top, cheapest, prob.evaluate([0] * prob.num_gates)]
    cur = top
    for t in sorted(targets, reverse=True):
        goal = Goal(required_correct(float(t), prob.n))
        if not goal.feasible(cur.correct):
            continue
        cur = local.run(goal, cur, fine=False, max_rounds=4, adjacent_only=True)
        found.append(cur)
    return pareto(found)


def calibration_frontier(
    prob: Problem, seeds: Sequence[Solution], target: float | None, points: int
) -> list[Solution]:
    """Frontier from the most accurate vector near ``seeds`` down to the cheapest vector,
    ``points`` targets (denser near ``target``); the seeds join the Pareto filter."""
    top = max(seeds, key=lambda s: (s.correct, -s.cost))
    top = LocalSearch(prob).run(Goal(None), top, fine=False, max_rounds=4, adjacent_only=True)
    low = prob.evaluate(list(prob.sizes)).correct / prob.n
    targets = frontier_targets(low, top.correct / prob.n, target, points)
    return pareto([*frontier(prob, top, targets), *seeds])


def selection_path(prob: Problem, points: Sequence[Solution], steps: int = 6) -> list[Solution]:
    """The family that a walk or a test on other samples goes through: from the full model
    (every gate off) along ``points`` (most accurate first), with ``steps`` index vectors
    interpolated between neighbours (each gate's index moved in equal steps), keeping only
    vectors that are cheaper than the one before. A fine, gradual path lets the first
    failure on the other samples stop close to where the target is crossed."""
    full = prob.evaluate([0] * prob.num_gates)
    path = [full]
    prev = np.zeros(prob.num_gates)
    for s in points:
        nxt = np.asarray(s.idx, np.float64)
        for a in np.linspace(0.0, 1.0, steps + 1)[1:]:
            idx = tuple(int(round(v)) for v in prev + a * (nxt - prev))
            cand = s if a == 1.0 else prob.evaluate(idx)
            if cand.cost < path[-1].cost and cand.idx != path[-1].idx:
                path.append(cand)
        prev = nxt
    return path
