"""Exact threshold search by branch and bound.

Gates 0..K-3 are enumerated depth first over their candidate indices; the last two gates
are solved at once with a 2-D value table (:func:`kernels.pair_best`), and a single gate
with a 1-D one. Candidates are the ranks present among the samples that reach the gate,
minus those a lower threshold dominates (:func:`kernels.prune_dominated`), so the result is
the optimum over *all* distinct score values (+inf) per gate. A subtree is cut when even
an oracle (each remaining sample correct if any later exit is right) misses the target,
or when every remaining sample leaving at the next exit would still cost more than the
incumbent. With ``grids`` the candidates are restricted to those indices (a global,
coarse version of the same search).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dgconvert.calibrate.kernels import PairInput, coordinate_values, pair_best, prune_dominated
from dgconvert.calibrate.problem import Goal, Problem, Solution


class _BranchAndBound:
    def __init__(
        self,
        prob: Problem,
        goal: Goal,
        incumbent: Solution | None,
        grids: Sequence[np.ndarray] | None,
    ) -> None:
        self.prob = prob
        self.goal = goal
        self.best = incumbent
        self.grids = grids
        k = prob.num_gates
        self.oracle = [prob.correct[:, g:].any(axis=1) for g in range(k + 1)]
        self.final_correct = prob.hits[k]

    def candidates(self, gate: int, reach: np.ndarray) -> np.ndarray:
        rank = self.prob.ranks[gate][reach]
        if self.grids is None:
            cand = np.arange(self.prob.sizes[gate] + 1)
        else:
            cand = np.union1d([0], self.grids[gate])
        return prune_dominated(cand, rank, self.prob.hits[gate][reach] == 0)

    def consider(self, idx: tuple[int, ...], correct: float, cost: float) -> None:
        sol = Solution(idx, int(round(correct)), cost)
        if self.goal.better(sol, self.best):
            self.best = sol

    def node(
        self, gate: int, reach: np.ndarray, prefix: tuple[int, ...], pc: int, pe: float
    ) -> None:
        prob = self.prob
        k = prob.num_gates
        upper = pc + int(np.count_nonzero(self.oracle[gate][reach]))
        lower = pe + reach.size * prob.costs[gate]
        if self.goal.prunable(upper, lower, self.best):
            return
        if reach.size == 0:
            self.consider(prefix + (0,) * (k - gate), pc, pe)
        elif k - gate == 1:
            self.last_gate(reach, prefix, pc, pe)
        elif k - gate == 2:
            self.last_two_gates(reach, prefix, pc, pe)
        else:
            self.branch(gate, reach, prefix, pc, pe)

    def _final_base(self, reach: np.ndarray, pc: int, pe: float) -> tuple[float, float]:
        return pc + float(self.final_correct[reach].sum()), pe + reach.size * self.prob.costs[-1]

    def _gains(self, gate: int, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prob = self.prob
        corr = prob.hits[gate][reach] - self.final_correct[reach]
        cost = np.full(reach.size, prob.costs[gate] - prob.costs[-1])
        return corr, cost

    def last_gate(self, reach: np.ndarray, prefix: tuple[int, ...], pc: int, pe: float) -> None:
        gate = self.prob.num_gates - 1
        cand = self.candidates(gate, reach)
        base_c, base_e = self._final_base(reach, pc, pe)
        corr, cost = coordinate_values(
            cand, self.prob.ranks[gate][reach], *self._gains(gate, reach)
        )
        cell = self.goal.best_cell(corr + base_c, cost + base_e)
        if cell is not None:
            self.consider(prefix + (int(cand[cell]),), corr[cell] + base_c, cost[cell] + base_e)

    def last_two_gates(
        self, reach: np.ndarray, prefix: tuple[int, ...], pc: int, pe: float
    ) -> None:
        p = self.prob.num_gates - 2
        cand_p, cand_q = self.candidates(p, reach), self.candidates(p + 1, reach)
        base_c, base_e = self._final_base(reach, pc, pe)
        rank_p = self.prob.ranks[p][reach]
        data = PairInput(
            rank_p,
            *self._gains(p, reach),
            rank_p,
            self.prob.ranks[p + 1][reach],
            *self._gains(p + 1, reach),
        )
        cell = pair_best(self.goal, (base_c, base_e), cand_p, cand_q, data, self.best)
        if cell is not None:
            idx = prefix + (int(cand_p[cell.row]), int(cand_q[cell.col]))
            self.consider(idx, cell.correct, cell.cost)

    def branch(
        self, gate: int, reach: np.ndarray, prefix: tuple[int, ...], pc: int, pe: float
    ) -> None:
        prob = self.prob
        cand = self.candidates(gate, reach)
        order = np.argsort(prob.ranks[gate][reach], kind="stable")
        reach = reach[order]
        ranks = prob.ranks[gate][reach]
        cum = np.concatenate([[0], np.cumsum(prob.correct[reach, gate])])
        leave = np.searchsorted(ranks, cand, side="right")
        for j in range(len(cand) - 1, -1, -1):
            m = int(leave[j])
            self.node(
                gate + 1,
                reach[m:],
                prefix + (int(cand[j]),),
                pc + int(cum[m]),
                pe + m * prob.costs[gate],
            )


def solve_exact(
    prob: Problem,
    goal: Goal,
    incumbent: Solution | None = None,
    grids: Sequence[np.ndarray] | None = None,
) -> Solution | None:
    """Optimal index vector for ``goal`` (None if nothing is feasible).

    ``incumbent`` (a known solution) only speeds up pruning; it is returned when nothing
    beats it. ``grids`` restricts gate k to the indices ``grids[k]`` (and 0).
    """
    bb = _BranchAndBound(prob, goal, incumbent, grids)
    bb.node(0, np.arange(prob.n), (), 0, 0.0)
    return None if bb.best is None else prob.evaluate(bb.best.idx)
