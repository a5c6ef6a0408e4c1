"""Non-finite gate scores in calibration: a gate that is off (+inf) never exits, whatever its
score; a NaN score never exits; a +inf score exits wherever the gate is on. Records,
simulate, the rank encoding and the search all follow these rules."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dgconvert.calibrate import GateRecords, calibrate, simulate
from dgconvert.calibrate.problem import Problem
from dgconvert.calibrate.search import brute_force_search, search

F32_MAX = float(np.finfo(np.float32).max)


def reference_exit(scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Per-sample loop with the rules written out."""
    out = []
    for row in scores:
        point = len(thresholds)
        for k, (s, t) in enumerate(zip(row, thresholds, strict=True)):
            if math.isinf(t) and t > 0:
                continue  # gate off
            if math.isnan(s):
                continue  # NaN never exits
            if s >= t:
                point = k
                break
        out.append(point)
    return np.array(out)


def nonfinite_instance(rng: np.random.Generator, n: int, gates: int
                       ) -> tuple[GateRecords, np.ndarray, np.ndarray]:
    scores = rng.integers(0, 4, (n, gates)).astype(np.float32) / 4
    special = rng.random((n, gates))
    scores[special < 0.15] = np.nan
    scores[(special >= 0.15) & (special < 0.3)] = np.inf
    scores[(special >= 0.3) & (special < 0.35)] = -np.inf
    y = rng.integers(0, 3, n)
    right = rng.random((n, gates + 1)) < 0.7
    labels = np.where(right, y[:, None], (y[:, None] + 1) % 3)
    costs = np.cumsum(rng.integers(1, 6, gates + 1)).astype(np.float64)
    return GateRecords(scores, labels[:, :gates], labels[:, gates]), y, costs


def test_records_accept_nan_and_inf() -> None:
    rec, _, _ = nonfinite_instance(np.random.default_rng(0), 50, 2)
    assert np.isnan(rec.scores).any() and np.isposinf(rec.scores).any()


@pytest.mark.parametrize("seed", range(3))
def test_simulate_follows_the_rules(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rec, y, costs = nonfinite_instance(rng, 300, 3)
    for t in ([math.inf, 0.5, 0.0], [0.25, math.inf, math.inf], [F32_MAX, -math.inf, 0.75],
              [math.inf] * 3):
        out = simulate(rec, y, t, costs)
        np.testing.assert_array_equal(out.result.exit_stage, reference_exit(rec.scores, t))
    # a +inf score at a gate that is off stays; at a gate that is on it exits
    off = simulate(rec, y, [math.inf] * 3, costs)
    assert off.cost_fraction == 1.0
    inf_rows = np.isposinf(rec.scores[:, 0])
    on = simulate(rec, y, [F32_MAX, math.inf, math.inf], costs)
    assert (on.result.exit_stage[inf_rows] == 0).all()
    nan_rows = np.isnan(rec.scores).all(axis=1)
    low = simulate(rec, y, [-math.inf] * 3, costs)
    assert (low.result.exit_stage[nan_rows] == 3).all() and (low.result.exit_stage[~nan_rows] < 3).all()


def test_rank_encoding_reproduces_simulate() -> None:
    rec, y, costs = nonfinite_instance(np.random.default_rng(4), 200, 2)
    prob = Problem.build(rec, y, costs)
    for idx in itertools.product(*(range(d + 1) for d in prob.sizes)):
        t = prob.to_thresholds(idx)
        assert not any(math.isnan(v) or v == -math.inf for v in t)
        np.testing.assert_array_equal(prob.exit_points(idx), simulate(rec, y, t, costs).result.exit_stage)
        assert prob.to_index(t) == tuple(idx)


def enumerate_cost(rec: GateRecords, y: np.ndarray, costs: np.ndarray, target: float) -> float:
    """Independent optimum: every distinct finite score, the largest float32 (the threshold
    that lets a +inf score exit) and +inf (off) per gate, through simulate(). A -inf
    threshold is left out: calibration never proposes one."""
    cands = []
    for k in range(rec.num_gates):
        s = rec.scores[:, k].astype(np.float64)
        s = np.where(np.isposinf(s), F32_MAX, s)
        keep = ~np.isnan(s) & (s > -np.inf)
        cands.append([math.inf, *sorted(set(s[keep].tolist()), reverse=True)])
    need = math.ceil(target * rec.n - 1e-9)
    best = math.inf
    for t in itertools.product(*cands):
        out = simulate(rec, y, list(t), costs)
        if out.correct >= need:
            best = min(best, out.cost)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_exact_search_with_nonfinite_scores_equals_enumeration(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    rec, y, costs = nonfinite_instance(rng, 60, 2)
    target = float(np.mean(rec.final_labels == y)) - 0.05
    ref = enumerate_cost(rec, y, costs, target)
    got = search(rec, y, costs, target_accuracy=target)
    assert got.exact and got.best.outcome.cost == ref
    assert brute_force_search(rec, y, costs, target_accuracy=target).outcome.cost == ref
    heuristic = search(rec, y, costs, target_accuracy=target, method="heuristic")
    assert heuristic.best.feasible and heuristic.best.outcome.cost >= ref


def test_calibrate_accepts_nonfinite_scores() -> None:
    rec, y, costs = nonfinite_instance(np.random.default_rng(7), 900, 3)
    for conf in (None, 0.9):
        res = calibrate(rec, y, costs, max_drop=0.05, confidence=conf, seed=1)
        assert all(t > -math.inf for t in res.thresholds)  # no NaN, no -inf
        again = simulate(rec, y, res.thresholds, costs)
        assert again.result.exit_stage.shape == (900,)
        assert res.to_json()  # strict JSON: no NaN anywhere
