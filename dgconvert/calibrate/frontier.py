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
    """Descending accuracy targets: evenly spread over [low, high], denser near ``target``."""
    if points <= 0:
        return np.zeros(0)
    spread = np.linspace(low, high, max(points // 2, 2))
    near = np.zeros(0)
    if target is not None:
        near = np.clip(target + np.linspace(-0.01, 0.03, points - len(spread)), low, high)
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
