"""Gates that pay for themselves (``calibrate --cost latency``).

With measured latency a gate that is on is not free: every sample that reaches it pays its
head and what the runtime does after it (the batch compaction, the ``If``), whether it exits
or not. A gate whose exits save less than that makes the gated model slower than the full
one. So the calibration is run for each set of gates left on (every set up to
:data:`EXHAUSTIVE_GATES` gates, else by backward elimination from all on), each with the
exit costs of that set, and the cheapest set that meets the target wins; the others are off
(+inf). The empty set is the full model, so the result never costs more than the full model
on the calibration data.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.pipeline import calibrate
from dgconvert.calibrate.report import CalibrationResult
from dgconvert.core.exits import GateRecords, as_records

#: up to this many gates every set of gates left on is calibrated (2**K runs)
EXHAUSTIVE_GATES = 6


@dataclass(frozen=True)
class GateCosts:
    """Measured ms/image on the backend at ``batch_size``: ``body[k]`` is stage ``k`` without
    its gate (K + 1 values, their sum the full model), ``gate[k]`` what gate ``k`` adds for
    each sample that reaches it while it is on (K values)."""

    body: tuple[float, ...]
    gate: tuple[float, ...]
    batch_size: int

    def __post_init__(self) -> None:
        body, gate = tuple(map(float, self.body)), tuple(map(float, self.gate))
        if len(body) != len(gate) + 1 or not gate:
            raise CalibrationError(
                f"gate costs: got {len(body)} stage costs and {len(gate)} gate costs; expected "
                "one stage cost more than gate costs (K + 1 stages, K >= 1 gates)")
        bad = [v for v in body + gate if not np.isfinite(v) or v < 0]
        if bad:
            raise CalibrationError(f"gate costs must be finite and >= 0 ms; got {bad}")
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "gate", gate)

    @property
    def num_gates(self) -> int:
        return len(self.gate)

    @property
    def full_ms(self) -> float:
        """The full model (every gate off)."""
        return float(sum(self.body))

    def exit_costs(self, on: Collection[int]) -> list[float]:
        """Cumulative ms/image of leaving at each exit with the gates in ``on`` switched on
        (a sample that exits at gate k has paid the heads of the gates up to k that are on)."""
        out, cum = [], 0.0
        for k, body in enumerate(self.body):
            cum += body + (self.gate[k] if k < self.num_gates and k in on else 0.0)
            out.append(cum)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"body_ms": list(self.body), "gate_ms": list(self.gate),
                "batch_size": self.batch_size, "full_ms": self.full_ms}


def gate_sets(num_gates: int) -> Iterator[frozenset[int]]:
    """Every set of gates left on, the largest first (for up to :data:`EXHAUSTIVE_GATES`)."""
    for size in range(num_gates, -1, -1):
        for on in itertools.combinations(range(num_gates), size):
            yield frozenset(on)


def _with_gates_on(rec: GateRecords, on: frozenset[int]) -> GateRecords:
    """The records with the scores of the gates not in ``on`` NaN: nobody exits there."""
    scores = rec.scores.copy()
    off = [j for j in range(scores.shape[1]) if j not in on]
    scores[:, off] = np.nan
    return GateRecords(scores, rec.labels, rec.final_labels)


def calibrate_gates_that_pay(
    records: Any,
    y: Any,
    costs: GateCosts,
    **calibrate_options: Any,
) -> CalibrationResult:
    """:func:`~dgconvert.calibrate.calibrate` with the gates that do not pay turned off:
    each set of gates left on is calibrated (its thresholds meet the target by the
    calibration's own rule), and the set whose thresholds cost least (ms/image on the
    calibration split) wins. ``calibrate_options`` go to every run. The result's
    ``selection["gates_that_pay"]`` records each set tried, its cost and whether it met the
    target."""
    rec = as_records(records)
    k = rec.scores.shape[1]
    if costs.num_gates != k:
        raise CalibrationError(
            f"gate costs are for {costs.num_gates} gates; the records have {k}. Fix: measure "
            "the gate costs on the same bundle")
    tried: list[dict[str, Any]] = []
    results: dict[frozenset[int], CalibrationResult] = {}

    def run(on: frozenset[int]) -> CalibrationResult | None:
        if on in results:
            return results[on]
        try:
            r = calibrate(_with_gates_on(rec, on), y, costs.exit_costs(on), **calibrate_options)
        except CalibrationError as exc:
            tried.append({"on": sorted(on), "error": str(exc)})
            return None
        results[on] = r
        tried.append({"on": sorted(on), "cost_ms": r.ours.calibration.cost,
                      "feasible": r.ours.feasible})
        return r

    if k <= EXHAUSTIVE_GATES:
        for on in gate_sets(k):
            run(on)
    else:  # backward elimination: drop the gate whose removal saves most, while one does
        on = frozenset(range(k))
        best = run(on)
        while on:
            trials = [(r.ours.calibration.cost, sorted(on - {j}), on - {j})
                      for j in on if (r := run(on - {j})) is not None]
            if not trials:
                break
            cost, _, smaller = min(trials)
            if best is not None and cost >= best.ours.calibration.cost:
                break
            best, on = results[smaller], smaller
    if not results:
        raise CalibrationError(
            "no set of gates could be calibrated: "
            + "; ".join(f"gates {t['on']}: {t['error']}" for t in tried))
    # each run's choice meets the target by the calibration's own rule; the cheapest wins
    # (fewer gates on breaks ties)
    chosen = min(results, key=lambda s: (results[s].ours.calibration.cost, len(s), sorted(s)))
    return _restricted(results[chosen], chosen, costs, tried)


def _restricted(result: CalibrationResult, on: frozenset[int], costs: GateCosts,
                tried: Sequence[dict[str, Any]]) -> CalibrationResult:
    """``result`` with the gates not in ``on`` off (+inf) and the search recorded."""
    def switched(point: Any) -> Any:
        t = tuple(v if j in on else float("inf") for j, v in enumerate(point.thresholds))
        return replace(point, thresholds=t)

    selection = dict(result.selection)
    selection["gates_that_pay"] = {
        "on": sorted(on), "off": [j for j in range(costs.num_gates) if j not in on],
        **costs.to_dict(), "tried": list(tried)}
    return replace(result, ours=switched(result.ours), search=switched(result.search),
                   selection=selection)


def describe_gates_that_pay(record: dict[str, Any]) -> str:
    """One sentence for the terminal from ``selection["gates_that_pay"]``."""
    gates = ", ".join(f"{j} {ms * 1000:.1f} µs" for j, ms in enumerate(record["gate_ms"]))
    off = record["off"]
    verdict = (f"gate(s) {off} do not pay and are off" if off else "every gate pays")
    best = {tuple(t["on"]): t.get("cost_ms") for t in record["tried"]}
    chosen = best.get(tuple(record["on"]))
    cost = "" if chosen is None else f" ({chosen:.4f} ms/image vs {record['full_ms']:.4f} for the full model on the calibration data)"
    return (f"Measured cost per image of each gate that is on (batch {record['batch_size']}): "
            f"{gates}; {verdict}{cost}")
