"""Integer encoding of a calibration problem, shared by every search algorithm.

Gate k's distinct scores sorted descending give ``values[k][1:]``; ``values[k][0]`` is
``+inf``. ``rank[i, k]`` (1-based) is the position of sample i's score in that list. A
threshold vector is held as an index vector ``idx``: gate k lets sample i exit iff
``rank[i, k] <= idx[k]``, i.e. ``score >= values[k][idx[k]]``. ``idx[k] = 0`` disables the
gate. Every distinct behaviour of a threshold on these samples has exactly one index, so
"all distinct score values (+inf) per gate" is ``idx[k] in 0..D_k``.

Non-finite scores (see :mod:`records`): a +inf score is ranked as the largest float32,
the threshold that lets it exit with its gate on; a NaN score gets rank ``D_k + 1``, which
no index reaches, so it never exits. So does a -inf score: only a -inf threshold would let
it out, and calibration never proposes one (it has no JSON encoding).

Costs are kept as totals over samples (not means) so integer costs stay exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dgconvert.core.exits import GateRecords, first_fire

_REL_TOL = 1e-12


def close(a: float, b: float) -> bool:
    """Costs equal up to float noise."""
    return abs(a - b) <= _REL_TOL * max(1.0, abs(a), abs(b))


def required_correct(target: float, n: int) -> int:
    """Smallest number of correct samples m with ``m / n >= target`` (float-noise safe)."""
    return min(max(math.ceil(target * n - 1e-9), 0), n)


class Scored(Protocol):
    """Anything with a number correct and a total cost."""

    @property
    def correct(self) -> float: ...

    @property
    def cost(self) -> float: ...


@dataclass(frozen=True)
class Solution:
    """A threshold index vector with its number of correct samples and total cost."""

    idx: tuple[int, ...]
    correct: int
    cost: float


@dataclass(frozen=True)
class Goal:
    """``need`` given: min cost s.t. correct >= need (ties: more correct).
    ``need`` None: max correct (ties: less cost)."""

    need: int | None

    def feasible(self, correct: float) -> bool:
        return self.need is None or correct >= self.need

    def better(self, a: Scored, b: Scored | None) -> bool:
        """Is ``a`` strictly preferable to ``b`` (``None`` = nothing found yet)?"""
        if not self.feasible(a.correct):
            return False
        if b is None:
            return True
        cheaper = a.cost < b.cost and not close(a.cost, b.cost)
        if self.need is None:
            return a.correct > b.correct or (a.correct == b.correct and cheaper)
        if close(a.cost, b.cost):
            return a.correct > b.correct
        return cheaper

    def prunable(self, upper_correct: float, lower_cost: float, best: Scored | None) -> bool:
        """Can a subtree with these bounds (most correct, least cost) not beat ``best``?"""
        return bool(self.hopeless(np.array([upper_correct]), np.array([lower_cost]), best)[0])

    def hopeless(self, upper: np.ndarray, lower: np.ndarray, best: Scored | None) -> np.ndarray:
        """Vectorised :meth:`prunable` over arrays of bounds."""
        need = -np.inf if self.need is None else self.need - 0.5
        out = upper < need
        if best is None:
            return out
        dearer = lower > best.cost + _REL_TOL * max(1.0, abs(best.cost))
        if self.need is None:
            return out | (upper < best.correct - 0.5) | ((upper < best.correct + 0.5) & dearer)
        return out | dearer

    def best_cell(self, correct: np.ndarray, cost: np.ndarray) -> int | None:
        """Flat index of the preferred cell of two equal-shape tables (None: none feasible)."""
        corr = correct.ravel()
        cst = cost.ravel()
        if self.need is None:
            top = corr.max()
            pool = corr >= top - 0.5
            masked = np.where(pool, cst, np.inf)
            return int(masked.argmin())
        pool = corr >= self.need - 0.5
        if not pool.any():
            return None
        masked = np.where(pool, cst, np.inf)
        low = float(masked.min())
        near = pool & (cst <= low + _REL_TOL * max(1.0, abs(low)))
        return int(np.where(near, corr, -1.0).argmax())


@dataclass(frozen=True)
class Problem:
    """Rank-encoded calibration data (see the module docstring)."""

    rank: np.ndarray  # int64 [n, K]
    values: tuple[np.ndarray, ...]  # per gate float64 [D_k + 1], values[k][0] = +inf
    correct: np.ndarray  # bool [n, K + 1]; column K = final stage
    costs: np.ndarray  # float64 [K + 1]
    ranks: tuple[np.ndarray, ...]  # contiguous columns of ``rank``
    hits: tuple[np.ndarray, ...]  # columns of ``correct`` as float64 (K + 1 of them)

    @classmethod
    def build(cls, records: GateRecords, y: np.ndarray, exit_costs: np.ndarray) -> Problem:
        """Encode validated records, ground truth and exit costs."""
        k = records.num_gates
        rank = np.empty((records.n, k), np.int64)
        values = []
        top = float(np.finfo(np.float32).max)
        for g in range(k):
            s = records.scores[:, g].astype(np.float64)
            s = np.where(s == np.inf, top, s)
            nan = np.isnan(s) | (s == -np.inf)
            uniq, inv = np.unique(-s[~nan], return_inverse=True)
            rank[~nan, g] = inv.ravel() + 1
            rank[nan, g] = uniq.size + 1
            values.append(np.concatenate([[np.inf], -uniq]))
        labels = np.concatenate([records.labels, records.final_labels[:, None]], axis=1)
        correct = labels == y[:, None]
        return cls(
            rank,
            tuple(values),
            correct,
            np.asarray(exit_costs, np.float64),
            tuple(np.ascontiguousarray(rank[:, g]) for g in range(k)),
            tuple(correct[:, g].astype(np.float64) for g in range(k + 1)),
        )

    @property
    def n(self) -> int:
        return int(self.rank.shape[0])

    @property
    def num_gates(self) -> int:
        return int(self.rank.shape[1])

    @property
    def sizes(self) -> tuple[int, ...]:
        """D_k: number of distinct scores per gate (largest index)."""
        return tuple(len(v) - 1 for v in self.values)

    def to_index(self, thresholds: Sequence[float] | np.ndarray) -> tuple[int, ...]:
        """Index vector that behaves like ``thresholds`` on these samples."""
        out = []
        for v, t in zip(self.values, np.asarray(thresholds, np.float64), strict=True):
            ascending = v[:0:-1]
            out.append(int(len(ascending) - np.searchsorted(ascending, t, side="left")))
        return tuple(out)

    def to_thresholds(self, idx: Sequence[int]) -> tuple[float, ...]:
        """Threshold values (a distinct score, or +inf) of an index vector."""
        return tuple(float(v[i]) for v, i in zip(self.values, idx, strict=True))

    def exit_points(self, idx: Sequence[int]) -> np.ndarray:
        """Exit point per sample (K = final stage)."""
        return first_fire(self.rank <= np.asarray(idx, np.int64)[None, :])

    def fallback(
        self, idx: Sequence[int], moved: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exit point, correctness and cost per sample with the ``moved`` gates disabled."""
        fires = self.rank <= np.asarray(idx, np.int64)[None, :]
        fires[:, list(moved)] = False
        point = first_fire(fires)
        return point, self.correct[np.arange(self.n), point].astype(np.float64), self.costs[point]

    def evaluate(self, idx: Sequence[int]) -> Solution:
        """Correct count and total cost of an index vector."""
        point = self.exit_points(idx)
        corr = int(np.count_nonzero(self.correct[np.arange(self.n), point]))
        counts = np.bincount(point, minlength=self.num_gates + 1)
        return Solution(tuple(int(i) for i in idx), corr, float(counts @ self.costs))
