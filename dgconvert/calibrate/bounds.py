"""Accuracy that holds on new data with a chosen probability (Learn-then-Test).

Method. A family of threshold vectors is fitted on one part of the labelled data (the
search's frontier: most accurate first, then ever cheaper). On the other, held-out part
(n samples) each vector j is a test of H0_j: "true accuracy < target", i.e. error rate
> eps = 1 - target. Its errors E_j are Binomial(n, p_j), so the exact (Clopper-Pearson)
p-value is ``P(Binomial(n, eps) <= E_j)``; equivalently H0_j is rejected at level delta iff
the one-sided Clopper-Pearson upper bound on p_j at confidence 1 - delta is below eps.
Vectors are tested in the family's fixed order at level delta = 1 - confidence, stopping
at the first non-rejection (fixed-sequence testing controls the family-wise error at
delta, no correction needed). The cheapest rejected vector is returned: with probability
>= confidence over the held-out draw, every rejected vector, hence the returned one, has
true accuracy >= target.

scipy is imported only when a bound is computed.

Assumptions. Held-out and future samples are i.i.d. (exchangeable) draws from the same
distribution; the family and its order do not depend on the held-out samples (fit it on
the other split); the guarantee is marginal over that draw, about accuracy (not cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.calibrate.errors import CalibrationError
from dgconvert.core.exits import GateRecords, simulate
from dgconvert.core.manifest import encode_thresholds


def split_indices(n: int, holdout: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into (calibration, held-out) sorted index arrays.

    ``holdout`` is the held-out fraction in [0, 1); 0 gives an empty held-out part.
    """
    if not 0.0 <= holdout < 1.0:
        raise CalibrationError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    m = int(round(n * holdout))
    if holdout > 0 and (m == 0 or m == n):
        raise CalibrationError(
            f"holdout={holdout} of {n} samples leaves one part empty; use more samples or holdout=0"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


def binomial_pvalue(errors: Any, n: int, target: float) -> np.ndarray:
    """Exact p-value of H0 "accuracy < target" after ``errors`` mistakes in ``n`` samples."""
    from scipy import stats

    return np.asarray(stats.binom.cdf(np.asarray(errors), n, 1.0 - target), dtype=np.float64)


def clopper_pearson_upper(errors: Any, n: int, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper confidence bound (level 1 - delta) on an error rate."""
    from scipy import stats

    e = np.asarray(errors, dtype=np.float64)
    safe = np.minimum(e, n - 1)
    upper = stats.beta.ppf(1.0 - delta, safe + 1, n - safe)
    return np.where(e >= n, 1.0, upper)


def accuracy_lower_bound(correct: Any, n: int, delta: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower confidence bound (level 1 - delta) on accuracy."""
    return 1.0 - clopper_pearson_upper(n - np.asarray(correct), n, delta)


@dataclass(frozen=True)
class BoundResult:
    """Outcome of fixed-sequence testing over a family of threshold vectors."""

    thresholds: tuple[float, ...]  # the chosen (cheapest rejected) vector
    selected: int  # its position in the family
    rejected: int  # how many leading vectors were rejected (certified)
    pvalues: tuple[float, ...]  # per family member, in order
    target: float
    confidence: float
    n_test: int
    accuracy: float  # on the test split
    cost_fraction: float  # on the test split
    lower_bound: float  # Clopper-Pearson lower bound on the chosen vector's accuracy

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (+inf thresholds as null)."""
        return {
            "method": "learn-then-test, fixed-sequence, Clopper-Pearson",
            "target": self.target,
            "confidence": self.confidence,
            "delta": 1.0 - self.confidence,
            "n_test": self.n_test,
            "family_size": len(self.pvalues),
            "rejected": self.rejected,
            "selected": self.selected,
            "thresholds": encode_thresholds(self.thresholds),
            "pvalues": list(self.pvalues),
            "test_accuracy": self.accuracy,
            "test_cost_fraction": self.cost_fraction,
            "accuracy_lower_bound": self.lower_bound,
        }


def check_confidence(confidence: float) -> float:
    """A confidence level in (0, 1)."""
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1) (e.g. 0.95), got {confidence!r}")
    return c


def fixed_sequence_test(
    records: GateRecords,
    y: np.ndarray,
    family: Sequence[Sequence[float]],
    exit_costs: Sequence[float] | np.ndarray,
    *,
    target: float,
    confidence: float,
    max_drop: float | None = None,
) -> BoundResult:
    """Test ``family`` (ordered, fitted on other data) on these samples; see the module doc.

    With ``max_drop`` the hypothesis is about the drop below the full model, tested paired
    on the same samples: H0_j "true drop > max_drop". A vector's drop is at most the rate
    ``p_j`` of samples the full model gets right and the vector gets wrong, so the exact
    binomial p-value ``P(Binomial(n, max_drop) <= L_j)`` of those losses ``L_j`` is valid
    (conservative: it gives no credit for samples the early exits fix).

    Raises :class:`CalibrationError` when not even the first vector is certified.
    """
    delta = 1.0 - check_confidence(confidence)
    if not family:
        raise CalibrationError("the family of threshold vectors to test is empty")
    n = records.n
    outcomes = [simulate(records, y, t, exit_costs) for t in family]
    if max_drop is None:
        pvals = binomial_pvalue([n - o.correct for o in outcomes], n, target)
    else:
        full_right = records.final_labels == y
        losses = [int(np.count_nonzero(full_right & (o.prediction != y))) for o in outcomes]
        pvals = binomial_pvalue(losses, n, 1.0 - max_drop)
    failed = np.flatnonzero(pvals > delta)
    rejected = int(failed[0]) if failed.size else len(family)
    if rejected == 0 and max_drop is not None:
        raise CalibrationError(
            f"cannot certify a drop <= {max_drop:.4%} below the full model with confidence "
            f"{1 - delta:.3g} on {n} held-out samples: the most accurate candidate loses "
            f"{losses[0]} samples the full model gets right (p-value {pvals[0]:.3g}). Allow a "
            "larger --max-drop, use more held-out data (--holdout) or drop --confidence."
        )
    if rejected == 0:
        lb = float(accuracy_lower_bound(outcomes[0].correct, n, delta))
        raise CalibrationError(
            f"cannot certify accuracy >= {target:.4%} with confidence {1 - delta:.3g} on {n} "
            f"held-out samples: the most accurate candidate scores {outcomes[0].accuracy:.4%} "
            f"there (lower bound {lb:.4%}, p-value {pvals[0]:.3g}). Lower the target, use more "
            "held-out data (--holdout) or drop --confidence."
        )
    chosen = min(range(rejected), key=lambda j: (outcomes[j].cost, -outcomes[j].correct))
    best = outcomes[chosen]
    return BoundResult(
        thresholds=tuple(float(t) for t in family[chosen]),
        selected=chosen,
        rejected=rejected,
        pvalues=tuple(float(p) for p in pvals),
        target=target,
        confidence=1.0 - delta,
        n_test=n,
        accuracy=best.accuracy,
        cost_fraction=best.cost_fraction,
        lower_bound=float(accuracy_lower_bound(best.correct, n, delta)),
    )
