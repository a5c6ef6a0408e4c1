"""Reference threshold choices: the d-gate paper's sequential rule, one shared threshold,
a shared exit-rate level, and exhaustive enumeration (for checking the search).
"""

from __future__ import annotations

from itertools import islice, product

import numpy as np

from dgconvert.calibrate.kernels import coordinate_values
from dgconvert.calibrate.problem import Goal, Problem, Solution
from dgconvert.core.exits import first_fire

_BRUTE_CELLS = 4_000_000


def sequential_index(prob: Problem, need: int) -> Solution:
    """The paper's rule: gates set one after another, earliest first, each to the lowest
    threshold that keeps ``need`` correct with the earlier gates fixed and the later ones
    off. A gate with no such threshold stays off (the result may then miss the target)."""
    idx = [0] * prob.num_gates
    for gate in range(prob.num_gates):
        point, base_c, _ = prob.fallback(idx, (gate,))
        reach = point > gate
        cand = np.arange(prob.sizes[gate] + 1)
        gain = prob.hits[gate][reach] - base_c[reach]
        corr, _ = coordinate_values(cand, prob.ranks[gate][reach], gain, np.zeros(gain.size))
        ok = np.flatnonzero(corr + base_c.sum() >= need - 0.5)
        idx[gate] = int(ok.max()) if ok.size else 0
    return prob.evaluate(idx)


def _scores(prob: Problem) -> np.ndarray:
    """Scores as ranked (+inf as the largest float32; NaN where a sample never exits)."""
    return np.stack(
        [np.append(prob.values[g], np.nan)[prob.rank[:, g]] for g in range(prob.num_gates)],
        axis=1,
    )


def _count_at_least(x: np.ndarray, w: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each t: sum of w over x >= t."""
    order = np.argsort(x, kind="stable")
    suffix = np.concatenate([np.cumsum(w[order][::-1])[::-1], [0.0]])
    return suffix[np.searchsorted(x[order], t, side="left")]


def shared_threshold(prob: Problem, goal: Goal) -> float | None:
    """Best single threshold used by every gate (None if none meets the goal).

    Sample i exits at gate k for shared ``t`` in ``(max_{j<k} s_ij, s_ik]`` and at the
    final stage for ``t > max_j s_ij``; summing these intervals over samples gives the
    correct count and cost of every candidate ``t`` in one sort.
    """
    s = _scores(prob)
    k = prob.num_gates
    nan = np.isnan(s)
    s = np.where(nan, -np.inf, s)  # never exits, except at a -inf threshold (left out below)
    prev = np.concatenate(
        [np.full((prob.n, 1), -np.inf), np.maximum.accumulate(s, axis=1)[:, :-1]], axis=1
    )
    cand = np.unique(np.concatenate([[np.inf], s.ravel()]))[::-1]
    if nan.any():
        cand = cand[cand > -np.inf]
    valid = (s > prev) & ~nan
    top = s.max(axis=1)
    fin_c = prob.correct[:, k].astype(np.float64)
    corr = fin_c.sum() - _count_at_least(top, fin_c, cand)
    cost = prob.n * prob.costs[k] - _count_at_least(top, np.full(prob.n, prob.costs[k]), cand)
    for g in range(k):
        v = valid[:, g]
        c = prob.correct[v, g].astype(np.float64)
        e = np.full(c.size, prob.costs[g])
        corr += _count_at_least(s[v, g], c, cand) - _count_at_least(prev[v, g], c, cand)
        cost += _count_at_least(s[v, g], e, cand) - _count_at_least(prev[v, g], e, cand)
    cell = goal.best_cell(np.rint(corr), cost)
    return None if cell is None else float(cand[cell])


def level_index(prob: Problem, goal: Goal, levels: int = 64) -> Solution | None:
    """Best common exit-rate level: every gate at the same sample quantile of its scores
    (a scale-free version of the shared threshold, used as a starting point)."""
    sorted_ranks = np.sort(prob.rank, axis=0)
    best: Solution | None = None
    for q in np.linspace(0.0, 1.0, levels + 1):
        pos = int(round(q * prob.n))
        idx = [0] * prob.num_gates
        if pos:
            idx = np.minimum(sorted_ranks[pos - 1], prob.sizes).tolist()  # NaN: D_k + 1
        sol = prob.evaluate(idx)
        if goal.better(sol, best):
            best = sol
    return best


def brute_force_index(prob: Problem, goal: Goal) -> Solution | None:
    """Exhaustive optimum over every index vector (all distinct scores and +inf per gate).

    Costs ``prod(D_k + 1) * n * K`` operations: for checking on small problems only.
    """
    k = prob.num_gates
    chunk = max(1, _BRUTE_CELLS // max(prob.n * k, 1))
    rows = np.arange(prob.n)
    best: Solution | None = None
    grid = product(*(range(d + 1) for d in prob.sizes))
    while True:
        combos = np.array(list(islice(grid, chunk)), dtype=np.int64).reshape(-1, k)
        if combos.size == 0:
            return best
        fires = prob.rank[None, :, :] <= combos[:, None, :]
        point = first_fire(fires)
        corr = prob.correct[rows[None, :], point].sum(axis=1).astype(np.float64)
        cost = prob.costs[point].sum(axis=1)
        cell = goal.best_cell(corr, cost)
        if cell is not None:
            sol = Solution(tuple(int(i) for i in combos[cell]), int(corr[cell]), float(cost[cell]))
            if goal.better(sol, best):
                best = sol
