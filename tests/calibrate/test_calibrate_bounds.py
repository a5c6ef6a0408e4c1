"""Statistical guarantee machinery: Clopper-Pearson bounds, fixed-sequence testing, the
seeded split, and coverage on synthetic gates whose true accuracy is known analytically."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dgconvert.calibrate import (
    CalibrationError,
    GateRecords,
    accuracy_lower_bound,
    binomial_pvalue,
    calibrate,
    clopper_pearson_upper,
    fixed_sequence_test,
    simulate,
    split_indices,
)

Q_FINAL = 0.9  # final-stage accuracy of the analytic model


def analytic_sample(rng: np.random.Generator, n: int) -> tuple[GateRecords, np.ndarray]:
    """Two gates with scores ~ U(0, 1); gate k is right with probability equal to its score,
    the final stage with probability Q_FINAL, all independently."""
    s = rng.random((n, 2)).astype(np.float32)
    right = rng.random((n, 3)) < np.c_[s, np.full(n, Q_FINAL)]
    y = np.zeros(n, np.int64)
    labels = np.where(right, 0, 1)
    return GateRecords(s, labels[:, :2], labels[:, 2]), y


def true_accuracy(t0: float, t1: float) -> float:
    """Accuracy on the population: exits at gate 0 w.p. 1 - t0 (right w.p. E[s | s >= t0])."""
    a, b = (min(max(t, 0.0), 1.0) for t in (t0, t1))
    return (1 - a * a) / 2 + a * ((1 - b * b) / 2 + Q_FINAL * b)


COSTS = np.array([1.0, 2.0, 4.0])


# --- Clopper-Pearson and p-values against scipy ------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (17, 200), (150, 1000)])
@pytest.mark.parametrize("delta", [0.05, 0.1])
def test_clopper_pearson_matches_scipy(k: int, n: int, delta: float) -> None:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact")
    assert float(clopper_pearson_upper(k, n, delta)) == pytest.approx(ci.high, abs=1e-10)
    # accuracy bound from correct counts = 1 - upper bound on the error rate
    ci_acc = stats.binomtest(n - k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact")
    assert float(accuracy_lower_bound(n - k, n, delta)) == pytest.approx(ci_acc.low, abs=1e-10)


@pytest.mark.parametrize(
    ("errors", "n", "target"), [(0, 50, 0.99), (5, 100, 0.9), (30, 200, 0.8), (9, 400, 0.95)]
)
def test_pvalue_matches_binomtest(errors: int, n: int, target: float) -> None:
    ref = stats.binomtest(errors, n, 1 - target, alternative="less").pvalue
    assert float(binomial_pvalue(errors, n, target)) == pytest.approx(ref, rel=1e-9)


def test_pvalue_and_bound_reject_the_same_counts() -> None:
    n, target, delta = 300, 0.9, 0.05
    e = np.arange(n + 1)
    by_p = binomial_pvalue(e, n, target) <= delta
    by_bound = clopper_pearson_upper(e, n, delta) <= 1 - target
    assert by_p.any() and not by_p.all()
    np.testing.assert_array_equal(by_p, by_bound)


@pytest.mark.parametrize(
    ("p", "n", "delta"), [(0.1, 200, 0.05), (0.03, 1000, 0.1), (0.4, 37, 0.05)]
)
def test_clopper_pearson_covers_exactly(p: float, n: int, delta: float) -> None:
    """P(upper bound < true rate) summed over the exact binomial law is at most delta."""
    e = np.arange(n + 1)
    miss = stats.binom.pmf(e, n, p)[clopper_pearson_upper(e, n, delta) < p].sum()
    assert miss <= delta
    assert miss > delta / 4  # and not absurdly conservative


# --- split ----------------------------------------------------------------------------------


def test_split_indices_seeded_disjoint_complete() -> None:
    cal, held = split_indices(1000, 0.3, seed=1)
    assert held.size == 300 and cal.size == 700
    assert np.intersect1d(cal, held).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[cal, held]), np.arange(1000))
    again = split_indices(1000, 0.3, seed=1)
    np.testing.assert_array_equal(held, again[1])
    assert not np.array_equal(held, split_indices(1000, 0.3, seed=2)[1])
    assert split_indices(10, 0.0)[1].size == 0
    with pytest.raises(CalibrationError):
        split_indices(10, 1.0)


# --- fixed-sequence testing -----------------------------------------------------------------


def staircase_records() -> tuple[GateRecords, np.ndarray]:
    """One gate, scores i/400; the gate is wrong exactly on scores in [0.1, 0.5)."""
    n = 400
    s = (np.arange(n) / n).astype(np.float32)[:, None]
    y = np.zeros(n, np.int64)
    gate = np.where((s[:, 0] >= 0.1) & (s[:, 0] < 0.5), 1, 0)[:, None]
    return GateRecords(s, gate, y.copy()), y


def test_fixed_sequence_stops_at_first_non_rejection() -> None:
    rec, y = staircase_records()
    family = [[math.inf], [0.5], [0.1], [0.9]]  # the last would pass but comes too late
    res = fixed_sequence_test(rec, y, family, [1.0, 3.0], target=0.9, confidence=0.95)
    assert res.rejected == 2
    assert res.thresholds == (0.5,)  # cheapest of the certified ones
    assert res.pvalues[0] <= 0.05 and res.pvalues[1] <= 0.05 and res.pvalues[2] > 0.05
    assert res.accuracy == 1.0 and res.lower_bound > 0.9
    assert res.cost_fraction == pytest.approx((200 * 1 + 200 * 3) / 400 / 3)


def test_fixed_sequence_refuses_when_nothing_is_certified() -> None:
    rec, y = staircase_records()
    small = rec.subset(np.arange(40, 80))
    with pytest.raises(CalibrationError, match="cannot certify"):
        fixed_sequence_test(small, y[40:80], [[math.inf]], [1.0, 3.0], target=0.99, confidence=0.95)


# --- coverage on the analytic model -----------------------------------------------------------


def test_analytic_model_matches_simulation() -> None:
    rec, y = analytic_sample(np.random.default_rng(0), 200_000)
    for t0, t1 in [(0.5, 0.7), (0.9, 0.2), (math.inf, 0.95)]:
        acc = simulate(rec, y, [t0, t1], COSTS).accuracy
        assert acc == pytest.approx(true_accuracy(t0, t1), abs=0.005)


def test_fixed_sequence_coverage_on_known_truth() -> None:
    """Family fixed in advance (shared thresholds from conservative to aggressive): the
    selected vector's true accuracy must reach the target in >= confidence of repetitions,
    while picking the cheapest empirically-feasible vector without a bound does not."""
    rng = np.random.default_rng(123)
    target, confidence, reps, n = 0.85, 0.9, 300, 800
    grid = np.linspace(1.0, 0.0, 41)
    family = [[float(t), float(t)] for t in grid]
    truth = np.array([true_accuracy(t, t) for t in grid])
    covered = naive_covered = 0
    chosen_truth = []
    for _ in range(reps):
        rec, y = analytic_sample(rng, n)
        res = fixed_sequence_test(rec, y, family, COSTS, target=target, confidence=confidence)
        j = res.selected
        covered += truth[j] >= target
        chosen_truth.append(truth[j])
        outs = [simulate(rec, y, f, COSTS) for f in family]
        ok = [i for i, o in enumerate(outs) if o.accuracy >= target]
        naive = min(ok, key=lambda i: outs[i].cost)
        naive_covered += truth[naive] >= target
    tol = 3 * math.sqrt(confidence * (1 - confidence) / reps)
    assert covered / reps >= confidence - tol
    assert naive_covered / reps < confidence - 0.1  # the simulation can tell a bad procedure
    assert np.mean(chosen_truth) < Q_FINAL  # the bound does not just keep the full model


def test_calibrate_with_confidence_covers_on_known_truth() -> None:
    rng = np.random.default_rng(7)
    target, confidence, reps = 0.85, 0.9, 24
    hits = 0
    for rep in range(reps):
        rec, y = analytic_sample(rng, 1600)
        res = calibrate(
            rec,
            y,
            COSTS,
            target_accuracy=target,
            confidence=confidence,
            holdout=0.5,
            seed=rep,
            frontier_points=16,
        )
        assert res.bound is not None and res.method.startswith("ltt")
        assert res.thresholds == res.bound.thresholds
        assert res.bound.pvalues[res.bound.selected] <= 1 - confidence
        assert res.heldout_accuracy == pytest.approx(res.bound.accuracy)
        hits += true_accuracy(*res.thresholds) >= target
    assert hits / reps >= confidence - 0.15


def test_confidence_needs_held_out_data() -> None:
    rec, y = analytic_sample(np.random.default_rng(1), 200)
    with pytest.raises(CalibrationError, match="holdout > 0"):
        calibrate(rec, y, COSTS, target_accuracy=0.8, confidence=0.9, holdout=0.0)
    with pytest.raises(CalibrationError, match="confidence must be in"):
        calibrate(rec, y, COSTS, target_accuracy=0.8, confidence=95)


def test_max_drop_test_credits_fixes() -> None:
    """With max_drop each vector gets the paired p-value of its (losses, fixes); the all-off
    vector (the full model, drop 0) passes untested."""
    from dgconvert.calibrate import paired_drop_pvalue
    from dgconvert.calibrate.bounds import paired_counts

    rng = np.random.default_rng(3)
    n = 4000
    y = rng.integers(0, 10, n)
    final = np.where(rng.random(n) < 0.9, y, (y + 1) % 10)
    gate_label = np.where(rng.random(n) < 0.8, y, (y + 2) % 10)
    scores = rng.random((n, 1)).astype(np.float32)
    rec = GateRecords(scores, gate_label[:, None], final)
    family = [[np.inf], [0.9], [0.5]]
    costs = [1.0, 2.0]
    res = fixed_sequence_test(rec, y, family, costs, target=0.0, confidence=0.9, max_drop=0.01)
    assert res.pvalues[0] == 0.0  # the full model needs no test
    for j in range(1, len(res.pvalues)):
        pred = simulate(rec, y, family[j], costs).result.labels
        losses, fixes = paired_counts(rec, y, pred)
        assert losses == int(((final == y) & (pred != y)).sum())
        assert fixes == int(((final != y) & (pred == y)).sum())
        assert res.pvalues[j] == pytest.approx(paired_drop_pvalue(losses, fixes, n, 0.01, 0.1))
    # vector 2 exits ~half the samples at a 20 % error rate: far above a 1-point drop
    assert res.rejected < 3 and res.selected < 2
