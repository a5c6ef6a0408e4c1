"""Vectorised value tables for moving one or two thresholds with the others fixed.

Candidates of a gate are ascending index lists ``cand`` (see :mod:`problem`); a sample of
rank r exits under ``cand[j]`` iff ``j >= position(r)``, the number of candidates below r.
With the other gates fixed, each sample's outcome when it does *not* exit at the moved
gate is fixed too, so the number correct and the total cost of every candidate are one
``bincount`` and a cumulative sum away (1-D), and of every candidate pair a 2-D histogram
with a cumulative sum along each axis (in row blocks, to bound memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgconvert.calibrate.problem import Goal, Scored

_BLOCK_CELLS = 2_000_000


def positions(cand: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Per sample, the first candidate position j with ``cand[j] >= rank`` (len = never)."""
    size = max(int(cand[-1]), int(rank.max(initial=0))) + 1
    below = np.cumsum(np.bincount(cand, minlength=size))
    return np.concatenate([[0], below[:-1]])[rank]


def hist(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """float64 ``bincount`` of length >= ``size`` (also for empty input)."""
    return np.bincount(index, weights, minlength=size).astype(np.float64, copy=False)


def prune_dominated(cand: np.ndarray, rank: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Drop candidates that a lower threshold weakly dominates.

    Lowering gate k's threshold from ``cand[j]`` to ``cand[j+1]`` only makes the samples
    ranked in ``(cand[j], cand[j+1]]`` exit at k instead of later. If gate k is right on
    all of them, accuracy cannot fall and (costs being non-decreasing) cost cannot rise,
    for any setting of the other gates; so ``cand[j]`` is never needed. ``rank``/``wrong``
    describe the samples that can reach the gate.
    """
    block = positions(cand, rank[wrong]) if wrong.any() else np.zeros(0, np.int64)
    bad = np.bincount(block, minlength=len(cand) + 1) > 0
    keep = np.ones(len(cand), bool)
    keep[:-1] = bad[1 : len(cand)]
    return cand[keep]


def coordinate_values(
    cand: np.ndarray, rank: np.ndarray, gain_correct: np.ndarray, gain_cost: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Change in (correct, cost) for each candidate, from samples of ``rank`` exiting."""
    alpha = positions(cand, rank)
    m = len(cand)
    corr = np.cumsum(hist(alpha, gain_correct, m + 1))[:m]
    cost = np.cumsum(hist(alpha, gain_cost, m + 1))[:m]
    return corr, cost


@dataclass(frozen=True)
class PairInput:
    """Samples seen by a two-gate move (rows: first gate p, columns: second gate q).

    ``row_*``: samples that can exit at p, with the (correct, cost) change if they do.
    ``pair_*``: samples that reach q when they do not exit at p, with their change if
    they exit at q.
    """

    row_rank: np.ndarray
    row_gain_correct: np.ndarray
    row_gain_cost: np.ndarray
    pair_rank_p: np.ndarray
    pair_rank_q: np.ndarray
    pair_gain_correct: np.ndarray
    pair_gain_cost: np.ndarray


@dataclass(frozen=True)
class PairCell:
    """Preferred cell of a pair table: candidate positions and the (correct, cost) there."""

    row: int
    col: int
    correct: float
    cost: float


def _suffix(start: np.ndarray, at: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``start[a] + sum of weights with at >= a``."""
    size = len(start)
    return np.cumsum(hist(at, weights, size)[:size][::-1])[::-1] + start


def _suffix_rows(h: np.ndarray, carry: np.ndarray) -> None:
    """In place: row a becomes the sum of rows >= a, plus ``carry``."""
    if h.shape[1] >= 64:
        h[-1] += carry
        for i in range(h.shape[0] - 2, -1, -1):
            h[i] += h[i + 1]
    else:
        h[:] = h[::-1].cumsum(axis=0)[::-1] + carry


def _table(
    flat: np.ndarray, w: np.ndarray, shape: tuple[int, int], carry: np.ndarray
) -> np.ndarray:
    t = hist(flat, w, shape[0] * shape[1]).reshape(shape)
    np.cumsum(t, axis=1, out=t)
    _suffix_rows(t, carry)
    return t


def pair_best(
    goal: Goal,
    base: tuple[float, float],
    cand_p: np.ndarray,
    cand_q: np.ndarray,
    data: PairInput,
    incumbent: Scored | None = None,
) -> PairCell | None:
    """Preferred (row, col) over all candidate pairs; values include ``base`` (correct, cost).

    Rows whose bounds cannot beat ``incumbent`` (or meet the goal) are skipped.
    """
    cols = len(cand_q)
    row_corr, row_cost = coordinate_values(cand_p, data.row_rank, data.row_gain_correct,
                                           data.row_gain_cost)
    row_corr, row_cost = base[0] + row_corr, base[1] + row_cost
    # A pair sample adds to row a iff it does not exit at p there: a < alpha, i.e. a <= gamma.
    gamma = positions(cand_p, data.pair_rank_p) - 1
    beta = positions(cand_q, data.pair_rank_q)
    use = (gamma >= 0) & (beta < cols)
    gamma, beta = gamma[use], beta[use]
    g_corr, g_cost = data.pair_gain_correct[use], data.pair_gain_cost[use]
    upper = _suffix(row_corr, gamma, np.maximum(g_corr, 0.0))
    lower = _suffix(row_cost, gamma, np.minimum(g_cost, 0.0))
    live = np.flatnonzero(~goal.hopeless(upper, lower, incumbent))
    if live.size == 0:
        return None
    first, stop = int(live[0]), int(live[-1]) + 1
    step = max(1, _BLOCK_CELLS // cols)
    if stop - first > step:
        order = np.argsort(gamma, kind="stable")
        gamma, beta, g_corr, g_cost = gamma[order], beta[order], g_corr[order], g_cost[order]
    tail = gamma >= stop
    carry = (
        np.cumsum(hist(beta[tail], g_corr[tail], cols)),
        np.cumsum(hist(beta[tail], g_cost[tail], cols)),
    )
    best: PairCell | None = None
    for hi in range(stop, first, -step):
        lo = max(first, hi - step)
        if stop - first > step:
            sel = slice(*np.searchsorted(gamma, [lo, hi], side="left"))
        else:
            sel = (gamma >= lo) & (gamma < hi)
        flat = (gamma[sel] - lo) * cols + beta[sel]
        corr_t = _table(flat, g_corr[sel], (hi - lo, cols), carry[0])
        cost_t = _table(flat, g_cost[sel], (hi - lo, cols), carry[1])
        carry = (corr_t[0].copy(), cost_t[0].copy())
        corr_t += row_corr[lo:hi, None]
        cost_t += row_cost[lo:hi, None]
        cell = goal.best_cell(corr_t, cost_t)
        if cell is None:
            continue
        r, c = divmod(cell, cols)
        found = PairCell(lo + r, c, float(corr_t[r, c]), float(cost_t[r, c]))
        if goal.better(found, best):
            best = found
    return best
