"""Gates that do not pay for themselves are off (`calibrate --cost latency`): the cost model,
the search over the sets of gates left on, and the result's record."""

from __future__ import annotations

import numpy as np
import pytest

from dgconvert.calibrate import CalibrationError, calibrate, simulate
from dgconvert.calibrate.gates_that_pay import (
    EXHAUSTIVE_GATES,
    GateCosts,
    calibrate_gates_that_pay,
    describe_gates_that_pay,
)
from dgconvert.core.exits import GateRecords


def test_exit_costs_add_the_heads_of_the_gates_that_are_on() -> None:
    c = GateCosts(body=(1.0, 2.0, 3.0), gate=(0.5, 0.25), batch_size=8)
    assert c.full_ms == 6.0
    assert c.exit_costs({0, 1}) == [1.5, 3.75, 6.75]
    assert c.exit_costs({1}) == [1.0, 3.25, 6.25]
    assert c.exit_costs(set()) == [1.0, 3.0, 6.0]
    for bad in ({"body": (1.0, 2.0), "gate": (0.5, 0.5)}, {"body": (1.0,), "gate": ()},
                {"body": (1.0, -2.0), "gate": (0.5,)}, {"body": (1.0, 2.0), "gate": (np.nan,)}):
        with pytest.raises(CalibrationError, match="gate costs"):
            GateCosts(batch_size=1, **bad)


def _records(n: int = 4000, k: int = 3, seed: int = 0) -> tuple[GateRecords, np.ndarray]:
    """Gate 0 is confident and right on 60 % of the samples; gates 1.. on 1 % each (their
    exits save little); wrong wherever they are not confident; the final stage is right on
    95 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    scores = rng.uniform(0.0, 0.4, (n, k)).astype(np.float32)
    labels = (y[:, None] + 1 + np.arange(k)[None, :]) % 10  # wrong everywhere ...
    for j in range(k):
        sure = rng.random(n) < (0.6 if j == 0 else 0.01)
        scores[sure, j] = rng.uniform(0.8, 1.0, sure.sum())
        labels[sure, j] = y[sure]  # ... except where the gate is confident
    final = np.where(rng.random(n) < 0.95, y, (y + 1) % 10)
    return GateRecords(scores, labels, final), y


def _cost_of(thresholds: tuple[float, ...], rec: GateRecords, y: np.ndarray,
             costs: GateCosts) -> float:
    """Mean ms/image of these thresholds, each gate that is on paying its head."""
    on = {j for j, t in enumerate(thresholds) if np.isfinite(t)}
    return simulate(rec, y, list(thresholds), costs.exit_costs(on)).cost


def test_a_gate_that_saves_nothing_is_turned_off() -> None:
    """Gate 0 saves the deep stages of 60 % of the samples: it stays on; gates 1 and 2 let
    1 % through, which saves less than their heads cost everyone reaching them: off. The
    plain calibration (the same prices, no gate switched off) keeps them and costs more."""
    rec, y = _records()
    costs = GateCosts(body=(1.0, 1.0, 1.0, 1.0), gate=(0.05, 0.05, 0.05), batch_size=64)
    res = calibrate_gates_that_pay(rec, y, costs, max_drop=0.01)
    t = res.thresholds
    assert np.isfinite(t[0]) and t[1:] == (np.inf, np.inf)
    record = res.selection["gates_that_pay"]
    assert record["on"] == [0] and record["off"] == [1, 2] and len(record["tried"]) == 8
    assert res.exit_costs == tuple(costs.exit_costs({0}))  # priced with gate 0 alone on
    # the chosen set is the cheapest of all that were tried
    assert min(r["cost_ms"] for r in record["tried"]) == pytest.approx(
        next(r["cost_ms"] for r in record["tried"] if r["on"] == [0]))
    # and it is cheaper than the full model and than all gates on, priced the same way
    plain = calibrate(rec, y, costs.exit_costs({0, 1, 2}), max_drop=0.01)
    assert _cost_of(t, rec, y, costs) < costs.full_ms
    assert _cost_of(t, rec, y, costs) < _cost_of(plain.thresholds, rec, y, costs)
    assert "gate(s) [1, 2] do not pay and are off" in describe_gates_that_pay(record)


def test_when_no_gate_pays_the_full_model_is_returned() -> None:
    """Heads dearer than anything the exits save: every gate off, the full model's cost."""
    rec, y = _records()
    costs = GateCosts(body=(0.1, 0.1, 0.1, 0.1), gate=(1.0, 1.0, 1.0), batch_size=1)
    res = calibrate_gates_that_pay(rec, y, costs, max_drop=0.01)
    assert res.thresholds == (np.inf,) * 3
    assert res.selection["gates_that_pay"]["on"] == []
    assert _cost_of(res.thresholds, rec, y, costs) == pytest.approx(costs.full_ms)


def test_many_gates_use_backward_elimination() -> None:
    """More than EXHAUSTIVE_GATES gates: far fewer runs than 2**K, the useless gates still
    go, and the result is no dearer than every gate on."""
    k = EXHAUSTIVE_GATES + 1
    rec, y = _records(k=k)
    costs = GateCosts(body=(1.0,) * (k + 1), gate=(0.05,) * k, batch_size=64)
    res = calibrate_gates_that_pay(rec, y, costs, max_drop=0.01)
    record = res.selection["gates_that_pay"]
    assert len(record["tried"]) < 2 ** k
    assert np.isfinite(res.thresholds[0]) and record["off"] == list(range(1, k))
    plain = calibrate(rec, y, costs.exit_costs(set(range(k))), max_drop=0.01)
    assert _cost_of(res.thresholds, rec, y, costs) < _cost_of(plain.thresholds, rec, y, costs)


def test_gate_costs_must_match_the_records() -> None:
    rec, y = _records()
    with pytest.raises(CalibrationError, match="gate costs are for 2 gates; the records have 3"):
        calibrate_gates_that_pay(rec, y, GateCosts((1.0, 1.0, 1.0), (0.1, 0.1), 1),
                                 max_drop=0.01)
