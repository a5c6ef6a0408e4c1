"""Accuracy or drop that holds on new data with a chosen probability (Learn-then-Test).

Method. A family of threshold vectors is fitted on one part of the labelled data (the
search's frontier: most accurate first, then ever cheaper). On the other, held-out part
(n samples) each vector j is a test of a null hypothesis H0_j, in the family's fixed order at
level delta = 1 - confidence, stopping at the first non-rejection (fixed-sequence testing
controls the family-wise error at delta, no correction needed). The cheapest rejected vector
is returned: with probability >= confidence over the held-out draw, every rejected vector,
hence the returned one, meets the target on the population.

- ``target`` (absolute accuracy): H0_j "accuracy < target". Errors are binomial, so the
  exact (Clopper-Pearson) p-value is ``P(Binomial(n, 1 - target) <= E_j)``.
- ``max_drop`` (paired, :func:`paired_drop_pvalue`): per sample d_i = loss_i - fix_i in
  {-1, 0, 1} (loss: the full model is right and the vector wrong; fix: the reverse); the
  drop is E[d]. H0_j "drop > max_drop" gets the exact unconditional p-value of
  ``D = sum d_i`` with the discordance rate q = P(d != 0) as nuisance parameter
  (Berger-Boos): the supremum of ``P(D <= D_obs)`` over the q within a one-sided
  Clopper-Pearson upper bound at level gamma = delta / 10, plus gamma. Samples an exit
  fixes count in the vector's favour. The all-off vector is the full model (drop 0): it
  needs no test and is the fallback when nothing else is certified.

scipy is imported only when a bound is computed.

Assumptions. Held-out and future samples are i.i.d. (exchangeable) draws from the same
distribution; the family and its order do not depend on the held-out samples (fit it on
the other split); the guarantee is marginal over that draw, about accuracy (not cost).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.calibrate.errors import CalibrationError
from dgconvert.calibrate.selection import is_full
from dgconvert.core.exits import GateRecords, simulate
from dgconvert.core.manifest import encode_thresholds

log = logging.getLogger(__name__)

_GRID = 48  # nuisance values (discordance rates) at which the paired p-value is maximised
_TAIL = 1e-13  # binomial tail mass left out of the sums (added back, conservatively)


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


def paired_counts(
    records: GateRecords, y: np.ndarray, prediction: np.ndarray
) -> tuple[int, int]:
    """(losses, fixes) of a prediction against the full model on the same samples."""
    full_right = records.final_labels == y
    right = prediction == y
    return int(np.count_nonzero(full_right & ~right)), int(np.count_nonzero(~full_right & right))


def _tail_le(t: int, n: int, eps: float, q: np.ndarray) -> np.ndarray:
    """``sup P(L - F <= t)`` over trinomials with discordance rate ``q`` (one value per
    entry) and drop >= ``eps``: the drop ``max(eps, -q)``. Sums over the discordant count
    m up to far in the upper tail; the tail beyond is added whole (conservative)."""
    from scipy import special, stats

    q = np.clip(np.asarray(q, np.float64), max(eps, 0.0), 1.0)
    qm = float(q.max())
    hi = int(min(n, math.ceil(n * qm + 12 * math.sqrt(n * qm * (1 - qm)) + 40)))
    m = np.arange(hi + 1, dtype=np.float64)[None, :]
    qq = q[:, None]
    e = np.maximum(eps, -qq)
    r = np.clip(np.where(qq > 0, (qq + e) / (2 * np.where(qq > 0, qq, 1.0)), 0.5), 0.0, 1.0)
    k = np.floor((t + m) / 2)
    inner = stats.binom.cdf(k, m, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        logpmf = (special.gammaln(n + 1) - special.gammaln(m + 1) - special.gammaln(n - m + 1)
                  + special.xlogy(m, qq) + special.xlog1py(n - m, -qq))
    tail = special.bdtrc(hi, n, q) if hi < n else np.zeros_like(q)
    out = (np.exp(logpmf) * inner).sum(axis=1) + tail
    return np.minimum(out, 1.0)


def paired_drop_pvalue(losses: int, fixes: int, n: int, max_drop: float, delta: float) -> float:
    """Exact p-value of H0 "drop > max_drop" from paired counts (see the module doc).

    ``losses``/``fixes``: samples the full model gets right and the vector wrong / the
    reverse, out of ``n``; ``delta`` sets the nuisance level gamma = delta / 10.
    """
    if n <= 0:
        return 1.0
    eps = float(max_drop)
    if not -1.0 < eps < 1.0:
        raise CalibrationError(f"max_drop must be in (-1, 1) as a fraction, got {max_drop!r}")
    gamma = delta / 10.0
    m = losses + fixes
    q_up = 1.0 if m >= n else float(clopper_pearson_upper(m, n, gamma))
    low = max(eps, 0.0)
    if q_up < low:  # a drop >= eps needs a discordance rate >= eps
        return gamma
    grid = np.unique(np.r_[np.linspace(low, q_up, _GRID), q_up])
    return float(min(1.0, _tail_le(losses - fixes, n, eps, grid).max() + gamma))


def drop_upper_bound(losses: int, fixes: int, n: int, delta: float, tol: float = 1e-6) -> float:
    """Smallest drop ``e`` (within ``tol``) that the paired test certifies (``drop <= e``
    with confidence 1 - delta); 1.0 when none is."""
    if n <= 0 or paired_drop_pvalue(losses, fixes, n, 1.0 - 1e-9, delta) > delta:
        return 1.0
    lo = max(-1.0 + 1e-9, (losses - fixes) / n)  # the observed drop is never certified
    hi = min(1.0 - 1e-9, lo + 8.0 * math.sqrt(losses + fixes + 4.0) / n + 1e-3)
    if paired_drop_pvalue(losses, fixes, n, lo, delta) <= delta:
        lo = -1.0 + 1e-9
    if paired_drop_pvalue(losses, fixes, n, hi, delta) > delta:
        hi = 1.0 - 1e-9
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if paired_drop_pvalue(losses, fixes, n, mid, delta) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class BoundResult:
    """Outcome of fixed-sequence testing over a family of threshold vectors."""

    thresholds: tuple[float, ...]  # the chosen (cheapest rejected) vector
    selected: int  # its position in the family; -1: the full model (fallback)
    rejected: int  # how many leading vectors were rejected (certified)
    pvalues: tuple[float, ...]  # per tested family member, in order
    target: float
    confidence: float
    n_test: int
    accuracy: float  # on the test split
    cost_fraction: float  # on the test split
    lower_bound: float  # Clopper-Pearson lower bound on the chosen vector's accuracy
    max_drop: float | None = None  # the certified drop (paired test), None: absolute target
    drop_upper_bound: float | None = None  # tightest drop the paired test certifies
    fallback: bool = False  # nothing was certified: the full model (drop 0) is returned
    family_size: int = 0  # vectors in the family (those after the first failure untested)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (+inf thresholds as null)."""
        method = (
            "learn-then-test, fixed-sequence, Clopper-Pearson"
            if self.max_drop is None
            else "learn-then-test, fixed-sequence, paired exact unconditional (Berger-Boos)"
        )
        return {
            "method": method,
            "target": self.target,
            "max_drop": self.max_drop,
            "confidence": self.confidence,
            "delta": 1.0 - self.confidence,
            "n_test": self.n_test,
            "family_size": self.family_size or len(self.pvalues),
            "tested": len(self.pvalues),
            "rejected": self.rejected,
            "selected": self.selected,
            "fallback": self.fallback,
            "thresholds": encode_thresholds(self.thresholds),
            "pvalues": list(self.pvalues),
            "test_accuracy": self.accuracy,
            "test_cost_fraction": self.cost_fraction,
            "accuracy_lower_bound": self.lower_bound,
            "drop_upper_bound": self.drop_upper_bound,
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

    With ``max_drop`` the test is paired (:func:`paired_drop_pvalue`); the all-off vector
    passes without a test, and when nothing is certified the full model is returned
    (``fallback``, logged). With an absolute ``target`` nothing certified raises
    :class:`CalibrationError`.
    """
    delta = 1.0 - check_confidence(confidence)
    if not family:
        raise CalibrationError("the family of threshold vectors to test is empty")
    n = records.n
    k = records.num_gates
    outcomes = [simulate(records, y, t, exit_costs) for t in family]
    if max_drop is None:
        pvals = binomial_pvalue([n - o.correct for o in outcomes], n, target)
    else:
        pv = []
        for t, o in zip(family, outcomes, strict=True):
            if is_full(t):
                pv.append(0.0)
                continue
            losses, fixes = paired_counts(records, y, o.result.labels)
            pv.append(paired_drop_pvalue(losses, fixes, n, max_drop, delta))
            if pv[-1] > delta:
                break  # fixed sequence: later vectors are never tested
        pvals = np.asarray(pv)
    failed = np.flatnonzero(pvals > delta)
    rejected = int(failed[0]) if failed.size else len(pvals)
    if rejected == 0 and max_drop is None:
        lb = float(accuracy_lower_bound(outcomes[0].correct, n, delta))
        raise CalibrationError(
            f"cannot certify accuracy >= {target:.4%} with confidence {1 - delta:.3g} on {n} "
            f"held-out samples: the most accurate candidate scores {outcomes[0].accuracy:.4%} "
            f"there (lower bound {lb:.4%}, p-value {pvals[0]:.3g}). Lower the target, use more "
            "held-out data (--holdout), use --max-drop or drop --confidence."
        )
    if rejected == 0:
        chosen, thresholds = -1, (math.inf,) * k
        best = simulate(records, y, thresholds, exit_costs)
    else:
        chosen = min(range(rejected), key=lambda j: (outcomes[j].cost, -outcomes[j].correct))
        thresholds = tuple(float(t) for t in family[chosen])
        best = outcomes[chosen]
    fallback = is_full(thresholds)
    if fallback:
        first = next((p for p in pvals if p > 0.0), float("nan"))
        log.warning(
            "no gated threshold vector is certified (drop <= %.4g with confidence %.3g on %d "
            "samples; first gated p-value %.3g): falling back to the full model",
            max_drop, 1 - delta, n, first,
        )
    drop_ub = None
    if max_drop is not None:
        losses, fixes = paired_counts(records, y, best.result.labels)
        drop_ub = 0.0 if is_full(thresholds) else drop_upper_bound(losses, fixes, n, delta)
    return BoundResult(
        thresholds=thresholds,
        selected=chosen,
        rejected=rejected,
        pvalues=tuple(float(p) for p in pvals),
        target=target,
        confidence=1.0 - delta,
        n_test=n,
        accuracy=best.accuracy,
        cost_fraction=best.cost_fraction,
        lower_bound=float(accuracy_lower_bound(best.correct, n, delta)),
        max_drop=max_drop,
        drop_upper_bound=drop_ub,
        fallback=fallback,
        family_size=len(family),
    )
