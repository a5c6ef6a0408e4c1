"""The paired drop test (validity on trinomials with known truth, crediting fixes), the
fallback to the full model, and default-mode selection on its own samples."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from dgconvert.calibrate import (
    CalibrationError,
    GateRecords,
    calibrate,
    drop_upper_bound,
    fixed_sequence_test,
    paired_drop_pvalue,
    simulate,
    split_indices,
)
from dgconvert.calibrate.selection import estimate, walk_frontier

DELTA = 0.1


def draw(rng: np.random.Generator, n: int, drop: float, q: float) -> tuple[int, int]:
    """(losses, fixes) of n paired samples: d = +1 w.p. (q + drop) / 2, -1 w.p. (q - drop) / 2."""
    counts = rng.multinomial(n, [(q + drop) / 2, (q - drop) / 2, 1 - q])
    return int(counts[0]), int(counts[1])


@pytest.mark.parametrize("q", [0.02, 0.1, 0.4])
def test_paired_test_is_valid_at_the_boundary(q: float) -> None:
    """True drop exactly max_drop (the hardest null): rejected in at most delta of draws."""
    rng = np.random.default_rng(int(q * 1000))
    n, eps, reps = 600, 0.01, 200
    rejected = sum(paired_drop_pvalue(*draw(rng, n, eps, q), n, eps, DELTA) <= DELTA
                   for _ in range(reps))
    assert rejected / reps <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / reps)


def test_paired_test_has_power_and_credits_fixes() -> None:
    """A vector that loses as often as the allowed drop but fixes as many samples is certified
    (a test counting losses only cannot), and the bound covers the true drop."""
    rng = np.random.default_rng(5)
    n, eps, q, true_drop = 3000, 0.003, 0.03, -0.005
    hits = sum(paired_drop_pvalue(*draw(rng, n, true_drop, q), n, eps, DELTA) <= DELTA
               for _ in range(60))
    assert hits >= 40  # about 83 % expected (the margin is 2.5 standard errors)
    # losses alone (no credit for fixes) at ~1.4 % are far above a 0.3-point drop
    assert paired_drop_pvalue(42, 0, n, eps, DELTA) > 0.5


def test_drop_upper_bound_inverts_the_test() -> None:
    ub = drop_upper_bound(30, 20, 2000, DELTA)
    assert paired_drop_pvalue(30, 20, 2000, ub + 1e-6, DELTA) <= DELTA
    assert paired_drop_pvalue(30, 20, 2000, ub - 1e-3, DELTA) > DELTA
    assert 5 / 1000 < ub < 0.02  # above the observed 0.5 points, not absurdly so


Q_FINAL = 0.9


def analytic_sample(rng: np.random.Generator, n: int) -> tuple[GateRecords, np.ndarray]:
    """Two gates, scores ~ U(0, 1), gate k right w.p. its score, final w.p. Q_FINAL."""
    s = rng.random((n, 2)).astype(np.float32)
    right = rng.random((n, 3)) < np.c_[s, np.full(n, Q_FINAL)]
    labels = np.where(right, 0, 1)
    return GateRecords(s, labels[:, :2], labels[:, 2]), np.zeros(n, np.int64)


def true_drop(t0: float, t1: float) -> float:
    a, b = (min(max(t, 0.0), 1.0) for t in (t0, t1))
    return Q_FINAL - ((1 - a * a) / 2 + a * ((1 - b * b) / 2 + Q_FINAL * b))


COSTS = np.array([1.0, 2.0, 4.0])


def test_fixed_sequence_drop_guarantee_covers_on_known_truth() -> None:
    """Family fixed in advance: the chosen vector's true drop is within max_drop in at least
    1 - delta of draws, and the test still picks gated vectors most of the time."""
    rng = np.random.default_rng(11)
    eps, reps, n = 0.01, 60, 1000
    grid = np.linspace(1.0, 0.6, 21)
    family = [[math.inf, math.inf]] + [[float(t), float(t)] for t in grid]
    truth = np.array([0.0] + [true_drop(t, t) for t in grid])
    assert truth.max() > 3 * eps  # the family crosses the target
    chosen, naive = [], []
    for _ in range(reps):
        rec, y = analytic_sample(rng, n)
        res = fixed_sequence_test(rec, y, family, COSTS, target=0.0, confidence=1 - DELTA,
                                  max_drop=eps)
        chosen.append(max(res.selected, 0))
        full = float(np.mean(rec.final_labels == y))
        drops = [full - simulate(rec, y, f, COSTS).accuracy for f in family]
        naive.append(max(j for j, d in enumerate(drops) if d <= eps))
    covered = np.mean(truth[chosen] <= eps)
    assert covered >= 1 - DELTA - 3 * math.sqrt(DELTA * (1 - DELTA) / reps)
    assert np.mean(np.array(chosen) > 0) > 0.5
    assert np.mean(truth[naive] <= eps) < 1 - DELTA - 0.1  # the simulation tells bad from good


def test_fallback_to_the_full_model(caplog: pytest.LogCaptureFixture) -> None:
    """Gates that are always wrong: nothing gated is certifiable, so the full model (drop 0)
    is returned, said so and logged; an absolute target nothing certifies is an error."""
    rng = np.random.default_rng(2)
    n = 1200
    y = rng.integers(0, 5, n)
    final = np.where(rng.random(n) < 0.9, y, (y + 1) % 5)
    rec = GateRecords(rng.random((n, 2)).astype(np.float32), ((y + 2) % 5)[:, None].repeat(2, 1),
                      final)
    with caplog.at_level(logging.WARNING, logger="dgconvert.calibrate.bounds"):
        res = calibrate(rec, y, COSTS, max_drop=0.003, confidence=0.9, seed=1)
    assert res.fallback and res.bound is not None and res.bound.fallback
    assert res.thresholds == (math.inf, math.inf) and res.bound.drop_upper_bound == 0.0
    assert "full model" in caplog.text
    assert res.to_dict()["fallback"] is True and "guarantee" in res.promise
    cal = split_indices(n, 0.5, 1)[0]  # the search part (confidence mode's default holdout)
    full = float(np.mean(final[cal] == y[cal]))  # reachable there, not certifiable on 600
    with pytest.raises(CalibrationError, match="cannot certify"):
        calibrate(rec, y, COSTS, target_accuracy=full - 0.003, confidence=0.9, seed=1)


def test_walk_stops_at_the_first_failure_and_falls_back() -> None:
    rec, y = analytic_sample(np.random.default_rng(4), 4000)
    grid = [1.0, 0.97, 0.9, 0.5, 0.95, 0.0]  # 0.95 would pass but comes after a failure
    family = [[t, t] for t in grid]
    walk = walk_frontier(rec, y, family, COSTS, target=0.0, max_drop=0.01)
    drops = [true_drop(t, t) for t in grid]
    assert drops[3] > 0.05 and walk.passed == 3
    assert walk.thresholds == (0.9, 0.9) and not walk.fallback
    bad = walk_frontier(rec, y, family[3:], COSTS, target=0.0, max_drop=0.01)
    assert bad.fallback and bad.thresholds == (math.inf, math.inf)


def test_default_mode_estimate_is_unbiased_on_known_truth() -> None:
    """Selected on one part, estimated on another: the held-out drop estimate is unbiased
    for the chosen vector's true drop, and its 90 % interval holds it most of the time."""
    rng = np.random.default_rng(8)
    errors, holds = [], 0
    reps = 30
    for rep in range(reps):
        rec, y = analytic_sample(rng, 3000)
        res = calibrate(rec, y, COSTS, max_drop=0.02, seed=rep, frontier_points=16)
        est = res.expected
        assert est is not None and est.n == 900
        truth = true_drop(*res.thresholds)
        errors.append(est.drop - truth)
        holds += est.drop_interval[0] <= truth <= est.drop_interval[1]
    se = np.std(errors) / math.sqrt(reps)
    assert abs(np.mean(errors)) < 3 * se + 1e-3
    assert holds / reps >= 0.7


def test_estimate_of_the_full_model_is_exact() -> None:
    rec, y = analytic_sample(np.random.default_rng(1), 500)
    est = estimate(rec, y, [math.inf, math.inf], COSTS)
    assert est is not None and est.drop == 0.0 and est.drop_interval == (0.0, 0.0)
    assert est.cost == 4.0 and est.cost_fraction == 1.0
