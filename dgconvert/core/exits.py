"""The exit rule and its arithmetic (torch-free): the result of a gated prediction, gate
records from the collection pass, and the exact simulation of thresholds on them.

A sample exits at the first gate ``k`` that is on (``thresholds[k] < +inf``) with
``scores[i, k] >= thresholds[k]`` and takes ``labels[i, k]``; otherwise it takes
``final_labels[i]``. Non-finite scores: a gate that is off never exits, whatever the score
(+inf included); a NaN score never exits; a +inf score exits wherever the gate is on.
``exit_costs[k]`` (length K+1, non-decreasing) is the cumulative cost paid by a sample
leaving at exit point ``k``; ``k = K`` is the final stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.errors import CalibrationError


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
    """First gate with ``score >= threshold`` per sample, ``K`` when none fires.

    A gate whose threshold is +inf is off and never fires, whatever the score (+inf too);
    a NaN score never fires."""
    t = np.asarray(thresholds)
    return first_fire((scores >= t[None, :]) & (t < np.inf)[None, :]).astype(np.int64)


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
    point = exit_points(records.scores, t)
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
