"""The exit rule and its arithmetic (torch-free): the result of a gated prediction, gate
records from the collection pass, and the exact simulation of thresholds on them.

A sample exits at the first gate ``k`` that is on (``thresholds[k] < +inf``) with
``scores[i, k] >= thresholds[k]`` and takes ``labels[i, k]``; otherwise it takes
``final_labels[i]``. Non-finite scores: a gate that is off never exits, whatever the score
(+inf included); a NaN score never exits; a +inf score exits wherever the gate is on.
``exit_costs[k]`` (length K+1, non-decreasing) is the cumulative cost paid by a sample
leaving at exit point ``k``; ``k = K`` is the final stage.

:class:`ExitRule` is the one place that rule is written: every path that decides exits
(the runner's, the pool's, the serve split's, the torch reference, :func:`simulate`) asks it.
A sample leaving at the final stage has the final stage's score (max softmax), except in
:func:`simulate`, whose records hold no final score (NaN there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.errors import CalibrationError, InputError


@dataclass
class GatedResult:
    """A gated prediction, per sample in the caller's order."""

    labels: np.ndarray  # int64 [N]
    exit_stage: np.ndarray  # int64 [N]; K = the final stage
    scores: np.ndarray  # float32 [N]; the exiting gate's score (final stage: max softmax)

    @classmethod
    def empty(cls, n: int = 0) -> GatedResult:
        """Uninitialised arrays for ``n`` samples (filled by :meth:`fill`)."""
        return cls(np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float32))

    def fill(self, rows: np.ndarray, labels: np.ndarray, scores: np.ndarray, stage: int) -> None:
        """Record that the caller's ``rows`` exited at ``stage`` with these labels/scores."""
        self.labels[rows], self.scores[rows], self.exit_stage[rows] = labels, scores, stage

    def exit_histogram(self, num_stages: int) -> np.ndarray:
        """Samples that exited at each stage (length ``num_stages``)."""
        return np.bincount(self.exit_stage, minlength=num_stages)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class ExitRule:
    """The exit rule for one set of thresholds, encoded once (build it with
    :meth:`from_thresholds`).

    ``exit_at[k]`` is the value gate k's score is compared against (``score >= exit_at[k]``):
    the threshold, or NaN where the gate is off (+inf), so an off gate never exits (+inf
    score included) and a NaN score never exits. ``tests[k]`` is that comparison as one
    C-level call (``tests[k](score)``: a bool for a scalar, a mask for an array), for hot
    loops.
    """

    thresholds: tuple[float, ...]  # as given; +inf = gate off
    exit_at: np.ndarray  # [K] as compared; NaN where the gate is off (read-only)
    off: frozenset[int]  # the gates that are off
    tests: tuple[Callable[[Any], Any], ...]  # tests[k](score) == (score >= exit_at[k])
    never_exits: bool  # every gate is off: every sample runs to the final stage

    @classmethod
    def from_thresholds(cls, thresholds: Sequence[float] | np.ndarray,
                        dtype: type[np.floating] = np.float32) -> ExitRule:
        """The rule for ``thresholds`` (one per gate, +inf = off; NaN is refused), compared
        in ``dtype`` (float32: what the runtime's graphs output)."""
        t = np.asarray(thresholds, dtype=dtype).reshape(-1)
        if np.isnan(t).any():
            raise InputError(f"thresholds {t.tolist()} contain NaN; use inf to disable a gate")
        on = t < np.inf
        exit_at = np.where(on, t, np.nan).astype(dtype)
        exit_at.flags.writeable = False
        return cls(tuple(float(v) for v in t), exit_at,
                   frozenset(np.flatnonzero(~on).tolist()),
                   tuple(v.__le__ for v in exit_at),  # exit_at[k] <= score
                   not on.any())

    @classmethod
    def of(cls, rule: ExitRule | Sequence[float] | np.ndarray) -> ExitRule:
        """``rule`` itself, or the rule of these thresholds."""
        return rule if isinstance(rule, ExitRule) else cls.from_thresholds(rule)

    @property
    def num_gates(self) -> int:
        return len(self.thresholds)

    def exits(self, k: int, score: Any) -> Any:
        """Which of gate ``k``'s ``score`` values exit there (bool, or a mask)."""
        return self.tests[k](score)

    def split(self, k: int, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(exits, keep)`` for gate ``k``: the mask of the rows that exit and the int64
        indices of those that continue (the next stage's ``keep``)."""
        exits = self.tests[k](score)
        keep = (~exits).nonzero()[0]
        if keep.dtype != np.int64:  # pragma: no cover - 32-bit platforms
            keep = keep.astype(np.int64)
        return exits, keep

    def points(self, scores: np.ndarray) -> np.ndarray:
        """The exit point of each sample of a score matrix ``[N, K]``: its first gate
        that exits, ``K`` (the final stage) where none does (int64 ``[N]``)."""
        return first_fire(np.asarray(scores) >= self.exit_at[None, :]).astype(np.int64)

    @staticmethod
    def reach(exits: Sequence[float] | np.ndarray, total: float | None = None) -> np.ndarray:
        """Rows (or shares) reaching each stage, from those exiting at each stage: ``total``
        (default: all of them) less the exits before it."""
        e = np.asarray(exits)
        if e.size == 0:
            return e
        before = np.concatenate([np.zeros(1, e.dtype), np.cumsum(e)[:-1]])
        return (e.sum() if total is None else total) - before


def _int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise CalibrationError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise CalibrationError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise CalibrationError(
            f"{name} holds a negative class index ({int(arr.min())}); class indices start at 0"
        )
    return arr


@dataclass(frozen=True)
class GateRecords:
    """Every gate's score and label, and the final label, for each of n samples.

    ``scores`` is stored as float32 [n, K] (what the runtime compares), ``labels`` as
    int64 [n, K] and ``final_labels`` as int64 [n]. Scores may be NaN or infinite (see the
    module doc for what they do).
    """

    scores: np.ndarray
    labels: np.ndarray
    final_labels: np.ndarray

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores)
        if scores.ndim != 2 or scores.shape[1] < 1:
            raise CalibrationError(
                f"scores must be [n, K] with K >= 1 gates, got shape {scores.shape}"
            )
        if scores.dtype == bool or not np.issubdtype(scores.dtype, np.number):
            raise CalibrationError(f"scores must be real numbers, got dtype {scores.dtype}")
        scores = scores.astype(np.float32, copy=False)  # NaN and +-inf allowed: see exit_points
        labels = _int_array("labels", self.labels, 2)
        final = _int_array("final_labels", self.final_labels, 1)
        if labels.shape != scores.shape:
            raise CalibrationError(
                f"labels have shape {labels.shape}, scores {scores.shape}; both must be [n, K]"
            )
        if final.shape != (scores.shape[0],):
            raise CalibrationError(
                f"final_labels have shape {final.shape}, expected ({scores.shape[0]},) "
                "(one per sample)"
            )
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "final_labels", final)

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.scores.shape[0])

    @property
    def num_gates(self) -> int:
        """Number of gates K."""
        return int(self.scores.shape[1])

    def subset(self, index: np.ndarray) -> GateRecords:
        """The records of the samples ``index`` (integer or boolean index)."""
        return GateRecords(self.scores[index], self.labels[index], self.final_labels[index])


def as_records(obj: Any) -> GateRecords:
    """``obj`` as :class:`GateRecords` (accepts any object with the three arrays)."""
    if isinstance(obj, GateRecords):
        return obj
    try:
        return GateRecords(obj.scores, obj.labels, obj.final_labels)
    except AttributeError as exc:
        raise CalibrationError(
            f"expected gate records (scores, labels, final_labels), got {type(obj).__name__}"
        ) from exc


def check_ground_truth(records: GateRecords, y: Any, num_classes: int | None = None) -> np.ndarray:
    """Validated ``y`` (int64 [n]); with ``num_classes``, every label must be below it."""
    y = _int_array("y", y, 1)
    if y.shape != (records.n,):
        raise CalibrationError(
            f"y has {y.shape[0]} labels but the records hold {records.n} samples"
        )
    if num_classes is not None:
        for name, arr in (
            ("y", y),
            ("labels", records.labels),
            ("final_labels", records.final_labels),
        ):
            if arr.size and arr.max() >= num_classes:
                raise CalibrationError(
                    f"{name} holds class {int(arr.max())}, outside the model's {num_classes} "
                    f"classes (0..{num_classes - 1}); check the data set's label mapping"
                )
    return y


def check_exit_costs(records: GateRecords, exit_costs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validated ``exit_costs`` (float64 [K+1], finite, >= 0, non-decreasing, last > 0)."""
    costs = np.asarray(exit_costs, dtype=np.float64)
    k = records.num_gates
    if costs.shape != (k + 1,):
        raise CalibrationError(
            f"exit_costs has shape {costs.shape}, expected ({k + 1},): one cumulative cost per "
            f"exit point for {k} gates plus the final stage"
        )
    if not np.isfinite(costs).all() or costs.min() < 0 or costs[-1] <= 0:
        raise CalibrationError(
            f"exit_costs must be finite, >= 0, with a positive last entry: {costs.tolist()}"
        )
    if np.any(np.diff(costs) < 0):
        raise CalibrationError(
            f"exit_costs must be non-decreasing (cumulative cost per exit point): {costs.tolist()}"
        )
    return costs


def check_thresholds(records: GateRecords, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Validated thresholds (float64 [K], no NaN; +inf disables a gate)."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (records.num_gates,):
        raise CalibrationError(
            f"got {t.size} thresholds for {records.num_gates} gates; pass one per gate "
            "(+inf disables a gate)"
        )
    if np.isnan(t).any():
        raise CalibrationError(f"thresholds contain NaN: {t.tolist()}")
    return t


@dataclass(frozen=True)
class Outcome:
    """Thresholds applied to labelled records: the per-sample :class:`GatedResult` and how
    it scores (accuracy, cost)."""

    accuracy: float
    cost: float  # mean cost per sample
    cost_fraction: float  # cost / exit_costs[K]
    exit_fractions: np.ndarray  # float64 [K+1]
    result: GatedResult  # labels, exit_stage (K = final stage), scores (NaN at the end)
    correct: int  # number of correct predictions


def first_fire(fires: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis (the first gate that fires), or the
    axis length ``K`` (the final stage) where none is."""
    always = np.ones((*fires.shape[:-1], 1), dtype=bool)
    return np.concatenate([fires, always], axis=-1).argmax(axis=-1)


def exit_points(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """First gate with ``score >= threshold`` per sample, ``K`` when none fires, compared
    in the thresholds' precision (:meth:`ExitRule.points`)."""
    t = np.asarray(thresholds)
    dtype = t.dtype.type if np.issubdtype(t.dtype, np.floating) else np.float64
    return ExitRule.from_thresholds(t, dtype).points(scores)


def simulate(
    records: GateRecords,
    y: Any,
    thresholds: Sequence[float] | np.ndarray,
    exit_costs: Sequence[float] | np.ndarray,
) -> Outcome:
    """Apply the exit rule with ``thresholds`` to every sample (vectorised)."""
    records = as_records(records)
    y = check_ground_truth(records, y)
    t = check_thresholds(records, thresholds)
    costs = check_exit_costs(records, exit_costs)
    k = records.num_gates
    point = ExitRule.from_thresholds(t, np.float64).points(records.scores)
    all_labels = np.concatenate([records.labels, records.final_labels[:, None]], axis=1)
    pred = np.take_along_axis(all_labels, point[:, None], axis=1)[:, 0]
    all_scores = np.concatenate([records.scores, np.full((records.n, 1), np.nan, np.float32)],
                                axis=1)
    scores = np.take_along_axis(all_scores, point[:, None], axis=1)[:, 0]
    n = max(records.n, 1)
    counts = np.bincount(point, minlength=k + 1)
    correct = int(np.count_nonzero(pred == y))
    cost = float(counts @ costs) / n
    return Outcome(
        accuracy=correct / n,
        cost=cost,
        cost_fraction=cost / float(costs[-1]),
        exit_fractions=counts / n,
        result=GatedResult(pred, point, scores),
        correct=correct,
    )
