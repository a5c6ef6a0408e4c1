"""Threshold calibration: exit-rule simulation, exact and heuristic search, baselines,
input errors and reports (numpy only, synthetic data)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgconvert.calibrate import (
    CalibrationError,
    GateRecords,
    calibrate,
    decode_thresholds,
    markdown_table,
    plot_frontier,
    simulate,
    split_indices,
)
from dgconvert.calibrate.search import (  # internal helpers of calibrate()
    brute_force_search,
    search,
    sequential_search,
    shared_search,
)
from dgconvert.core.errors import DGConvertError


def make_instance(
    rng: np.random.Generator,
    n: int,
    gates: int,
    *,
    levels: int | None = None,
    classes: int = 4,
) -> tuple[GateRecords, np.ndarray, np.ndarray]:
    """Random records whose gates are informative but noisy; ``levels`` makes ties.

    Gate accuracies are drawn at random, so a gate can be more accurate than the final stage
    (gates that raise accuracy).
    """
    if levels:
        scores = rng.integers(0, levels, (n, gates)).astype(np.float32) / levels
    else:
        scores = rng.random((n, gates)).astype(np.float32)
    y = rng.integers(0, classes, n)
    base = rng.uniform(0.3, 0.95, gates + 1)
    p_right = 0.5 * base[None, :] + 0.5 * np.c_[scores, np.full(n, 0.9)]
    right = rng.random((n, gates + 1)) < p_right
    wrong = (y[:, None] + rng.integers(1, classes, (n, gates + 1))) % classes
    labels = np.where(right, y[:, None], wrong)
    costs = np.cumsum(rng.integers(1, 10, gates + 1)).astype(np.float64)  # exact float sums
    return GateRecords(scores, labels[:, :gates], labels[:, gates]), y, costs


def naive_predict(rec: GateRecords, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loop implementation of the exit rule."""
    pred, point = [], []
    for i in range(rec.n):
        for k, t in enumerate(thresholds):
            if rec.scores[i, k] >= t:
                pred.append(rec.labels[i, k])
                point.append(k)
                break
        else:
            pred.append(rec.final_labels[i])
            point.append(rec.num_gates)
    return np.array(pred), np.array(point)


def full_accuracy(rec: GateRecords, y: np.ndarray) -> float:
    return float(np.mean(rec.final_labels == y))


def candidate_values(rec: GateRecords, k: int) -> list[float]:
    return [math.inf, *sorted(set(rec.scores[:, k].astype(float).tolist()), reverse=True)]


# --- simulate ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_simulate_matches_per_sample_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rec, y, costs = make_instance(rng, 200, 3, levels=6)  # ties: score == threshold exits
    t = [float(rec.scores[0, 0]), math.inf, float(rec.scores[5, 2])]
    out = simulate(rec, y, t, costs)
    pred, point = naive_predict(rec, t)
    np.testing.assert_array_equal(out.result.labels, pred)
    np.testing.assert_array_equal(out.result.exit_stage, point)
    assert out.accuracy == pytest.approx(np.mean(pred == y))
    assert out.cost == pytest.approx(np.mean(costs[point]))
    assert out.cost_fraction == pytest.approx(np.mean(costs[point]) / costs[-1])
    np.testing.assert_allclose(out.exit_fractions, np.bincount(point, minlength=4) / rec.n)


def test_all_gates_off_is_the_full_model() -> None:
    rec, y, costs = make_instance(np.random.default_rng(9), 100, 2)
    out = simulate(rec, y, [math.inf, math.inf], costs)
    assert out.accuracy == pytest.approx(full_accuracy(rec, y))
    assert out.cost_fraction == pytest.approx(1.0)


# --- exact search == brute force --------------------------------------------------------


def simulate_brute_force(
    rec: GateRecords, y: np.ndarray, costs: np.ndarray, target: float
) -> float:
    """Independent reference: simulate() over every combination of distinct scores/+inf."""
    best = math.inf
    for t in itertools.product(*(candidate_values(rec, k) for k in range(rec.num_gates))):
        out = simulate(rec, y, list(t), costs)
        if out.correct >= math.ceil(target * rec.n - 1e-9):
            best = min(best, out.cost)
    return best


def test_brute_force_matches_independent_enumeration() -> None:
    rng = np.random.default_rng(3)
    rec, y, costs = make_instance(rng, 14, 2, levels=5)
    target = full_accuracy(rec, y) - 0.1
    ref = simulate_brute_force(rec, y, costs, target)
    assert brute_force_search(rec, y, costs, target_accuracy=target).outcome.cost == pytest.approx(ref)


EXACT_CASES = [(seed, gates) for seed in range(14) for gates in (1, 2, 3)]


@pytest.mark.parametrize(("seed", "gates"), EXACT_CASES)
def test_exact_search_equals_brute_force(seed: int, gates: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = {1: 400, 2: 110, 3: 36}[gates]
    rec, y, costs = make_instance(rng, n, gates, levels=None if seed % 2 else 7)
    full = full_accuracy(rec, y)
    target = float(np.clip(full + rng.uniform(-0.2, 0.06), 0.0, 1.0))
    try:
        ref = brute_force_search(rec, y, costs, target_accuracy=target)
    except CalibrationError:
        with pytest.raises(CalibrationError):
            search(rec, y, costs, target_accuracy=target)
        return
    res = search(rec, y, costs, target_accuracy=target)
    assert res.exact
    assert res.best.feasible and res.best.outcome.accuracy >= target - 1e-12
    assert res.best.outcome.cost == ref.outcome.cost  # integer costs: exact equality


@pytest.mark.parametrize(("seed", "gates"), [(s, g) for s in range(8) for g in (2, 3, 4)])
def test_branch_and_bound_alone_equals_enumeration(seed: int, gates: int) -> None:
    """The exact solver without a local-search incumbent, in both goals."""
    from dgconvert.calibrate.baselines import brute_force_index
    from dgconvert.calibrate.exact import solve_exact
    from dgconvert.calibrate.problem import Goal, Problem, required_correct

    rng = np.random.default_rng(300 + seed)
    n = {2: 90, 3: 30, 4: 12}[gates]
    rec, y, costs = make_instance(rng, n, gates, levels=None if seed % 2 else 5)
    prob = Problem.build(rec, y, costs)
    need = required_correct(full_accuracy(rec, y) - rng.uniform(0.0, 0.2), n)
    for goal in (Goal(need), Goal(None)):
        ref, got = brute_force_index(prob, goal), solve_exact(prob, goal)
        assert (ref is None) == (got is None)
        if ref is not None and got is not None:
            assert (got.cost, got.correct) == (ref.cost, ref.correct)


@pytest.mark.parametrize("seed", range(3))
def test_exact_branch_and_bound_with_four_gates(seed: int) -> None:
    rng = np.random.default_rng(50 + seed)
    rec, y, costs = make_instance(rng, 11, 4, levels=None if seed else 3)
    target = full_accuracy(rec, y) - 0.1
    ref = brute_force_search(rec, y, costs, target_accuracy=target)
    res = search(rec, y, costs, target_accuracy=target, method="exact")
    assert res.exact and res.best.outcome.cost == ref.outcome.cost


def test_exact_search_reaches_above_full_model_when_gates_are_better() -> None:
    rng = np.random.default_rng(7)
    rec, y, costs = make_instance(rng, 150, 2)
    # Gate 0 is right whenever its score is high, the final stage is wrong half the time.
    labels = rec.labels.copy()
    labels[rec.scores[:, 0] > 0.5, 0] = y[rec.scores[:, 0] > 0.5]
    final = np.where(rng.random(150) < 0.5, y, (y + 1) % 4)
    rec = GateRecords(rec.scores, labels, final)
    target = full_accuracy(rec, y) + 0.1
    res = search(rec, y, costs, target_accuracy=target)
    ref = brute_force_search(rec, y, costs, target_accuracy=target)
    assert res.best.outcome.accuracy >= target > res.full.outcome.accuracy
    assert res.best.outcome.cost == ref.outcome.cost


def test_exact_search_three_gates_two_thousand_samples() -> None:
    rng = np.random.default_rng(11)
    rec, y, costs = make_instance(rng, 2000, 3)
    target = full_accuracy(rec, y) - 0.03
    exact = search(rec, y, costs, target_accuracy=target)
    heuristic = search(rec, y, costs, target_accuracy=target, method="heuristic")
    assert exact.exact and not heuristic.exact
    assert exact.best.feasible and heuristic.best.feasible
    assert exact.best.outcome.cost <= heuristic.best.outcome.cost


# --- baselines ---------------------------------------------------------------------------


def test_sequential_follows_the_paper_rule() -> None:
    rng = np.random.default_rng(5)
    rec, y, costs = make_instance(rng, 150, 3, levels=9)
    target = full_accuracy(rec, y) - 0.05
    need = math.ceil(target * rec.n - 1e-9)
    expected = [math.inf] * 3
    for k in range(3):  # lowest threshold that keeps the target, earlier gates fixed
        ok = [
            t
            for t in candidate_values(rec, k)
            if simulate(rec, y, expected[:k] + [t] + expected[k + 1 :], costs).correct >= need
        ]
        expected[k] = min(ok) if ok else math.inf
    got = sequential_search(rec, y, costs, target_accuracy=target)
    assert list(got.thresholds) == expected


def test_shared_is_the_cheapest_single_threshold() -> None:
    rng = np.random.default_rng(6)
    rec, y, costs = make_instance(rng, 150, 3, levels=9)
    target = full_accuracy(rec, y) - 0.05
    values = sorted(set(rec.scores.ravel().astype(float).tolist())) + [math.inf]
    outs = [simulate(rec, y, [t] * 3, costs) for t in values]
    ok = [o.cost for o in outs if o.accuracy >= target - 1e-12]
    got = shared_search(rec, y, costs, target_accuracy=target)
    assert got.feasible and got.outcome.cost == pytest.approx(min(ok))
    assert len(set(got.thresholds)) == 1


@pytest.mark.parametrize(
    ("seed", "gates", "n", "method"),
    [
        (0, 3, 300, "auto"),
        (1, 2, 800, "auto"),
        (2, 4, 3000, "heuristic"),
        (3, 3, 5000, "heuristic"),
    ],
)
def test_ours_never_worse_than_sequential_or_shared(
    seed: int, gates: int, n: int, method: str
) -> None:
    rng = np.random.default_rng(seed)
    rec, y, costs = make_instance(rng, n, gates, levels=None if seed % 2 else 30)
    for drop in (0.0, 0.02, 0.08):
        target = full_accuracy(rec, y) - drop
        res = search(rec, y, costs, target_accuracy=target, method=method)
        assert res.best.feasible
        for ref in (res.sequential, res.shared, res.full):
            if ref.feasible:
                assert res.best.outcome.cost <= ref.outcome.cost + 1e-9


def test_heuristic_matches_exact_on_small_problems() -> None:
    rng = np.random.default_rng(21)
    gaps = []
    for _ in range(6):
        rec, y, costs = make_instance(rng, 600, 3)
        target = full_accuracy(rec, y) - 0.04
        exact = search(rec, y, costs, target_accuracy=target).best.outcome.cost
        heur = search(rec, y, costs, target_accuracy=target, method="heuristic").best.outcome.cost
        gaps.append(heur / exact - 1)
    assert min(gaps) >= 0.0
    assert max(gaps) < 0.01


# --- errors ------------------------------------------------------------------------------


def test_unreachable_target_states_full_and_best_accuracy() -> None:
    rng = np.random.default_rng(8)
    rec, y, costs = make_instance(rng, 30, 2, levels=4)
    best = max(
        simulate(rec, y, [a, b], costs).accuracy
        for a in candidate_values(rec, 0)
        for b in candidate_values(rec, 1)
    )
    target = min(best + 0.02, 1.0)
    if target <= best:  # pragma: no cover - the instance is perfect
        pytest.skip("instance reaches 100 %")
    with pytest.raises(CalibrationError) as err:
        search(rec, y, costs, target_accuracy=target)
    msg = str(err.value)
    assert f"{full_accuracy(rec, y):.4%}" in msg
    assert f"{best:.4%}" in msg
    assert isinstance(err.value, DGConvertError) and isinstance(err.value, ValueError)


def test_record_shape_errors() -> None:
    s = np.zeros((5, 2), np.float32)
    lab = np.zeros((5, 2), np.int64)
    with pytest.raises(CalibrationError, match="labels have shape"):
        GateRecords(s, lab[:, :1], np.zeros(5, np.int64))
    with pytest.raises(CalibrationError, match="final_labels"):
        GateRecords(s, lab, np.zeros(4, np.int64))
    with pytest.raises(CalibrationError, match="integer"):
        GateRecords(s, lab.astype(float), np.zeros(5, np.int64))
    with pytest.raises(CalibrationError, match="real numbers"):
        GateRecords(s.astype(bool), lab, np.zeros(5, np.int64))
    with pytest.raises(CalibrationError, match="K >= 1"):
        GateRecords(np.zeros(5, np.float32), lab, np.zeros(5, np.int64))


def test_inputs_that_do_not_fit_together() -> None:
    rec, y, costs = make_instance(np.random.default_rng(1), 50, 2)
    with pytest.raises(CalibrationError, match="y has 49 labels"):
        calibrate(rec, y[:-1], costs, target_accuracy=0.5)
    with pytest.raises(CalibrationError, match=r"exit_costs has shape \(2,\)"):
        calibrate(rec, y, costs[:2], target_accuracy=0.5)
    with pytest.raises(CalibrationError, match="non-decreasing"):
        calibrate(rec, y, costs[::-1], target_accuracy=0.5)
    with pytest.raises(CalibrationError, match="3 thresholds for 2 gates"):
        simulate(rec, y, [1.0, 1.0, 1.0], costs)
    with pytest.raises(CalibrationError, match="exactly one"):
        calibrate(rec, y, costs, target_accuracy=0.5, max_drop=0.01)
    with pytest.raises(CalibrationError, match=r"target_accuracy=94.7; expected a fraction.*--target-acc percent"):
        calibrate(rec, y, costs, target_accuracy=94.7)
    with pytest.raises(CalibrationError, match=r"max_drop=30; expected a fraction.*--max-drop points"):
        calibrate(rec, y, costs, max_drop=30)


def test_bad_method_and_empty_records() -> None:
    rec, y, costs = make_instance(np.random.default_rng(4), 20, 2)
    with pytest.raises(CalibrationError, match="method must be one of"):
        search(rec, y, costs, target_accuracy=0.5, method="fast")
    empty = rec.subset(np.zeros(0, np.int64))
    with pytest.raises(CalibrationError, match="empty"):
        search(empty, y[:0], costs, target_accuracy=0.5)


def test_labels_outside_the_classes() -> None:
    rec, y, costs = make_instance(np.random.default_rng(2), 50, 2, classes=4)
    with pytest.raises(CalibrationError, match="outside the model's 3 classes"):
        calibrate(rec, y, costs, target_accuracy=0.5, num_classes=3)
    bad = GateRecords(rec.scores, rec.labels, np.where(np.arange(50) == 3, 7, rec.final_labels))
    with pytest.raises(CalibrationError, match="final_labels holds class 7"):
        calibrate(bad, y, costs, target_accuracy=0.5, num_classes=4)
    with pytest.raises(CalibrationError, match="negative"):
        calibrate(rec, np.where(np.arange(50) == 0, -1, y), costs, target_accuracy=0.5)


# --- calibrate + reports -----------------------------------------------------------------


@pytest.fixture(scope="module")
def result_and_data() -> tuple:
    rng = np.random.default_rng(42)
    rec, y, costs = make_instance(rng, 1500, 3)
    costs = costs * 1e9  # FLOPs
    res = calibrate(rec, y, costs, max_drop=0.02, holdout=0.3, seed=4)
    return res, rec, y, costs


def test_calibrate_selects_and_reports_on_disjoint_samples(result_and_data: tuple) -> None:
    """Default mode: the search sees one part, the frontier walk another, the estimate a
    third (the held-out part); each figure is recomputed here from its own part."""
    from dgconvert.calibrate.selection import estimate, walk_frontier

    res, rec, y, costs = result_and_data
    cal, held = split_indices(rec.n, 0.3, 4)
    sel_pos, search_pos = split_indices(cal.size, 0.5, 5)
    search_idx, select_idx = cal[search_pos], cal[sel_pos]
    assert len(set(search_idx) | set(select_idx) | set(held)) == rec.n  # disjoint, complete
    assert res.selection["n_search"] == search_idx.size
    assert res.selection["n_select"] == select_idx.size
    assert res.expected is not None and res.expected.n == held.size
    full_cal = float(np.mean(rec.final_labels[cal] == y[cal]))
    assert res.full_accuracy == pytest.approx(full_cal)
    assert res.target_accuracy == pytest.approx(full_cal - 0.02)
    # the search row is the search on the search part alone
    full_s = float(np.mean(rec.final_labels[search_idx] == y[search_idx]))
    ref = search(rec.subset(search_idx), y[search_idx], costs, target_accuracy=full_s - 0.02)
    assert res.search.thresholds == ref.best.thresholds
    # the chosen vector is the walk along the frontier on the selection part
    family = list(res.family)
    assert family[0] == (math.inf,) * 3  # the path starts at the full model
    walk = walk_frontier(
        rec.subset(select_idx), y[select_idx], family, costs, target=res.target_accuracy,
        max_drop=0.02, margin=res.selection["margin_se"],
    )
    assert res.thresholds == walk.thresholds and res.selection["passed"] == walk.passed
    # the estimate is the held-out part's, which neither the search nor the walk used
    again = estimate(rec.subset(held), y[held], res.thresholds, costs)
    assert res.expected == again
    out = simulate(rec.subset(held), y[held], list(res.thresholds), costs)
    assert res.heldout_accuracy == pytest.approx(out.accuracy) == res.expected.accuracy
    assert res.heldout_cost_fraction == pytest.approx(out.cost_fraction)
    lo, hi = res.expected.drop_interval
    assert lo <= res.expected.drop <= hi
    assert res.method.startswith("frontier-walk") and res.mode == "expected"


def test_json_keys_and_values(result_and_data: tuple) -> None:
    res = result_and_data[0]
    data = json.loads(res.to_json())
    for key in (
        "thresholds",
        "target_accuracy",
        "accuracy",
        "full_accuracy",
        "heldout_accuracy",
        "cost_fraction",
        "heldout_cost_fraction",
        "exit_fractions",
        "method",
        "comparison",
        "confidence",
    ):
        assert key in data
    assert decode_thresholds(data["thresholds"]) == list(res.thresholds)
    assert data["accuracy"] == res.accuracy
    assert sum(data["exit_fractions"]) == pytest.approx(1.0)
    assert set(data["comparison"]) == set(res.points()) - {"ours"}
    assert {"full", "sequential", "shared"} <= set(data["comparison"])
    assert data["mode"] == "expected" and "on average" in data["promise"]
    lo, hi = data["expected"]["drop_interval90"]
    assert lo <= data["expected"]["drop"] <= hi
    assert data["comparison"]["full"]["thresholds"] == [None, None, None]  # +inf -> null
    assert data["confidence"] is None and data["bound"] is None


def test_markdown_table_contents(result_and_data: tuple) -> None:
    res = result_and_data[0]
    text = markdown_table(res, latency_ms={"full": 10.0, "ours": 6.0})
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert "GFLOPs/image" in lines[0] and "FLOPs reduction" in lines[0] and "Speed-up" in lines[0]
    assert len(lines) == 2 + len(res.points())  # header, rule, one row per point
    ours = next(ln for ln in lines if ln.startswith("| dgconvert"))
    held = res.ours.heldout
    assert f"{held.accuracy:.2%}" in ours
    assert f"{held.cost / 1e9:.3f}" in ours
    assert f"{1 - held.cost / res.full.heldout.cost:.2%}" in ours
    assert "1.67×" in ours
    assert " / ".join(f"{100 * f:.1f}" for f in held.exit_fractions) in ours
    cal = markdown_table(res, split="calibration")
    assert f"{res.accuracy:.2%}" in cal


def test_plot_frontier_writes_png(result_and_data: tuple, tmp_path) -> None:
    res = result_and_data[0]
    assert len(res.frontier) >= 5
    acc = [f.accuracy for f in res.frontier]
    cost = [f.cost_fraction for f in res.frontier]
    assert acc == sorted(acc, reverse=True) and cost == sorted(cost, reverse=True)
    path = plot_frontier(res, tmp_path / "frontier.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_calibrate_without_holdout_reports_calibration_only() -> None:
    rec, y, costs = make_instance(np.random.default_rng(12), 400, 2)
    res = calibrate(rec, y, costs, max_drop=0.0, holdout=0.0, cost_unit="ms")
    assert res.heldout_accuracy is None and res.ours.calibration.n == 400
    assert res.accuracy >= res.full_accuracy - 1e-12  # max_drop=0 keeps full accuracy
    data = json.loads(res.to_json())
    assert data["heldout_accuracy"] is None and data["n_heldout"] == 0
    text = markdown_table(res)
    assert "Calibration split, n = 400" in text and "Speed-up (model)" in text
    with pytest.raises(ValueError, match="split"):
        markdown_table(res, split="heldout")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gates=st.integers(1, 3), n=st.integers(4, 30),
       levels=st.sampled_from([None, 3, 6]), slack=st.floats(-0.3, 0.05))
def test_exact_search_equals_brute_force_on_random_problems(seed: int, gates: int, n: int,
                                                           levels: int | None,
                                                           slack: float) -> None:
    """Property: on any small problem (ties included), the exact search's cost is the
    enumeration's, and both agree on whether the target is reachable."""
    rng = np.random.default_rng(seed)
    rec, y, costs = make_instance(rng, n, gates, levels=levels)
    target = float(np.clip(full_accuracy(rec, y) + slack, 0.0, 1.0))
    try:
        ref = brute_force_search(rec, y, costs, target_accuracy=target)
    except CalibrationError:
        with pytest.raises(CalibrationError):
            search(rec, y, costs, target_accuracy=target, method="exact")
        return
    res = search(rec, y, costs, target_accuracy=target, method="exact")
    assert res.best.outcome.cost == ref.outcome.cost
    assert res.best.outcome.accuracy >= target - 1e-12
