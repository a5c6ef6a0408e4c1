"""Local search over threshold indices: exact coordinate moves and two-gate moves.

A coordinate move re-optimises one gate over *all* its distinct scores with the others
fixed (one ``bincount`` + cumulative sum). A pair move re-optimises two gates jointly on
a 2-D table whose axes are candidate grids: sample quantiles of the gate's scores plus
geometric steps around the current value (coarse), or additionally every index within a
window of the current value (fine). Moves are accepted only when strictly better for the
goal, so the search never gets worse than its start and always terminates.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from dgconvert.calibrate.kernels import PairInput, coordinate_values, pair_best
from dgconvert.calibrate.problem import Goal, Problem, Solution

WINDOW = 512


def quantile_grid(prob: Problem, gate: int, size: int) -> np.ndarray:
    """``size`` indices at evenly spaced sample quantiles of the gate's scores, plus 0."""
    ranks = np.sort(prob.ranks[gate])
    pos = np.linspace(0, prob.n - 1, max(size, 2)).round().astype(np.int64)
    return np.union1d([0], np.minimum(ranks[pos], prob.sizes[gate]))  # NaN ranks: D_k + 1


class LocalSearch:
    """Coordinate and pair moves on one problem (grids cached)."""

    def __init__(self, prob: Problem, grid: int = 24) -> None:
        self.prob = prob
        self.coarse = [quantile_grid(prob, g, grid) for g in range(prob.num_gates)]
        self.full = [np.arange(d + 1) for d in prob.sizes]

    def axis(self, gate: int, current: int, fine: bool) -> np.ndarray:
        """Candidate indices of one gate for a pair move around ``current``."""
        top = self.prob.sizes[gate]
        steps = 2 ** np.arange(int(np.log2(max(top, 1))) + 1)
        near = [current - steps, [current], current + steps]
        if fine:
            near.append(np.arange(current - WINDOW, current + WINDOW + 1))
        return np.union1d(self.coarse[gate], np.clip(np.concatenate(near), 0, top))

    def coordinate(self, goal: Goal, cur: Solution, gate: int) -> Solution:
        """Best value of one gate with the others fixed."""
        prob = self.prob
        point, base_c, base_e = prob.fallback(cur.idx, (gate,))
        reach = point > gate
        corr, cost = coordinate_values(
            self.full[gate],
            prob.ranks[gate][reach],
            prob.hits[gate][reach] - base_c[reach],
            prob.costs[gate] - base_e[reach],
        )
        cell = goal.best_cell(corr + base_c.sum(), cost + base_e.sum())
        if cell is None:
            return cur
        idx = list(cur.idx)
        idx[gate] = int(cell)
        return self._accept(goal, cur, idx)

    def pair(self, goal: Goal, cur: Solution, p: int, q: int, fine: bool) -> Solution:
        """Best joint value of gates p < q over their candidate axes."""
        prob = self.prob
        cand_p, cand_q = self.axis(p, cur.idx[p], fine), self.axis(q, cur.idx[q], fine)
        point, base_c, base_e = prob.fallback(cur.idx, (p, q))
        rows, both = point > p, point > q
        data = PairInput(
            prob.ranks[p][rows],
            prob.hits[p][rows] - base_c[rows],
            prob.costs[p] - base_e[rows],
            prob.ranks[p][both],
            prob.ranks[q][both],
            prob.hits[q][both] - base_c[both],
            prob.costs[q] - base_e[both],
        )
        cell = pair_best(goal, (base_c.sum(), base_e.sum()), cand_p, cand_q, data, cur)
        if cell is None:
            return cur
        idx = list(cur.idx)
        idx[p], idx[q] = int(cand_p[cell.row]), int(cand_q[cell.col])
        return self._accept(goal, cur, idx)

    def _accept(self, goal: Goal, cur: Solution, idx: list[int]) -> Solution:
        if tuple(idx) == cur.idx:
            return cur
        new = self.prob.evaluate(idx)
        return new if goal.better(new, cur) else cur

    def run(
        self,
        goal: Goal,
        start: Solution,
        fine: bool = True,
        max_rounds: int = 100,
        adjacent_only: bool = False,
    ) -> Solution:
        """Improve a feasible ``start`` until no move helps (coarse, then ``fine`` pairs).

        ``adjacent_only`` limits pair moves to neighbouring gates (cheaper for many gates).
        """
        k = self.prob.num_gates
        pairs = (
            [(p, p + 1) for p in range(k - 1)] if adjacent_only else list(combinations(range(k), 2))
        )
        cur = start
        for level in (False, True) if fine else (False,):
            for _ in range(max_rounds):
                before = cur
                for gate in range(k):
                    cur = self.coordinate(goal, cur, gate)
                for p, q in pairs:
                    cur = self.pair(goal, cur, p, q, level)
                if cur == before:
                    break
        return cur
