"""`GatedRunner`: chains the stage graphs and compacts the batch between them.

For a batch, stage 0 runs on every row; gate k's score decides who exits; only the rows
that continue are named in ``keep`` and gathered by the *next* stage graph's first op, so
exited samples never reach deeper stages and no stage runs when nobody reaches it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.bundle import Bundle
from dgconvert.errors import InputError
from dgconvert.preprocess import prepare_images
from dgconvert.runtime.base import Backend


@dataclass
class GatedResult:
    """Per-sample outputs in the caller's order."""

    labels: np.ndarray  # int64 [N]
    exit_stage: np.ndarray  # int64 [N]; K = the final stage
    scores: np.ndarray  # float32 [N]; the exiting gate's score (final: max softmax)

    def exit_histogram(self, num_stages: int) -> np.ndarray:
        """Samples that exited at each stage (length ``num_stages``)."""
        return np.bincount(self.exit_stage, minlength=num_stages)


@dataclass
class GateRecords:
    """Every gate evaluated on every sample (the calibration pass)."""

    scores: np.ndarray  # float32 [N, K]
    labels: np.ndarray  # int64 [N, K]
    final_labels: np.ndarray  # int64 [N]


def _empty_result() -> GatedResult:
    return GatedResult(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    )


class GatedRunner:
    """Run a bundle with early exits on any batch size.

    ``backend`` is ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT engines for
    this GPU if built, else onnxruntime-gpu, else ONNX Runtime on the CPU). ``thresholds``
    default to the bundle's (calibrated) ones. Batches larger than ``max_batch`` are split.
    Extra keyword arguments go to the backend (e.g. ``threads=``, ``providers=``).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        backend: str | Backend = "auto",
        thresholds: list[float] | None = None,
        max_batch: int | None = 256,
        **backend_options: Any,
    ) -> None:
        from dgconvert.runtime import create_backend

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if isinstance(backend, Backend):
            self.backend, self.backend_reason = backend, "given"
        else:
            self.backend, self.backend_reason = create_backend(
                self.bundle, backend, **backend_options
            )
        self.thresholds = thresholds  # property setter validates
        limit = self.backend.max_batch()
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if limit is not None and (max_batch is None or max_batch > limit):
            max_batch = limit
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._stats = [0] * self.bundle.num_stages

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def thresholds(self) -> list[float]:
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: list[float] | None) -> None:
        t = self.bundle.thresholds if values is None else [float(v) for v in values]
        if len(t) != self.bundle.num_gates:
            raise InputError(
                f"got {len(t)} thresholds {t}; expected {self.bundle.num_gates} (one per gate)"
            )
        if any(np.isnan(v) for v in t):
            raise InputError(f"thresholds {t} contain NaN; use inf to disable a gate")
        self._thresholds = np.asarray(t, dtype=np.float32)

    @property
    def stats(self) -> list[int]:
        """Rows each stage processed since creation or :meth:`reset_stats`."""
        with self._lock:
            return list(self._stats)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = [0] * self.bundle.num_stages

    def _count(self, k: int, rows: int) -> None:
        with self._lock:
            self._stats[k] += rows

    def _chunks(self, n: int) -> list[slice]:
        step = self.max_batch or n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def prepare(self, images: Any) -> np.ndarray:
        """Validate and normalize a batch (see :func:`dgconvert.preprocess.prepare_images`)."""
        return prepare_images(images, self.bundle.input_shape, self.bundle.normalization)

    def predict(self, images: Any) -> GatedResult:
        """Labels, exit stages and scores for a batch, in the caller's order."""
        x = self.prepare(images)
        n = len(x)
        if n == 0:
            return _empty_result()
        res = GatedResult(
            np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float32)
        )
        for sl in self._chunks(n):
            self._predict_chunk(x[sl], res, sl.start)
        return res

    def _predict_chunk(self, x: np.ndarray, res: GatedResult, offset: int) -> None:
        t, last = self._thresholds, self.bundle.num_stages - 1
        rows = np.arange(offset, offset + len(x))  # caller rows of the current stage rows
        out = self.backend.run_stage(0, x, None)
        self._count(0, len(x))
        for k in range(1, last + 1):
            exits = out.score >= t[k - 1]
            if exits.any():
                done = rows[exits]
                res.labels[done] = out.label[exits]
                res.scores[done] = out.score[exits]
                res.exit_stage[done] = k - 1
            keep = np.flatnonzero(~exits)
            if keep.size == 0:
                return
            out = self.backend.run_stage(k, out.features, keep.astype(np.int64, copy=False))
            self._count(k, int(keep.size))
            rows = rows[keep]
        res.labels[rows] = out.label
        res.scores[rows] = out.score
        res.exit_stage[rows] = last

    def collect(self, images: Any) -> GateRecords:
        """Every gate's score and label and the final label for every sample (no exits)."""
        x = self.prepare(images)
        n, k_gates = len(x), self.bundle.num_gates
        rec = GateRecords(
            np.empty((n, k_gates), np.float32),
            np.empty((n, k_gates), np.int64),
            np.empty(n, np.int64),
        )
        for sl in self._chunks(n):
            m = sl.stop - sl.start
            keep = np.arange(m, dtype=np.int64)
            out = self.backend.run_stage(0, x[sl], None)
            for k in range(1, self.bundle.num_stages):
                rec.scores[sl, k - 1] = out.score
                rec.labels[sl, k - 1] = out.label
                out = self.backend.run_stage(k, out.features, keep)
            rec.final_labels[sl] = out.label
        return rec

    def full_logits(self, images: Any) -> np.ndarray:
        """Logits of the ungated model (for comparisons and benchmarks)."""
        x = self.prepare(images)
        if len(x) == 0:
            return np.zeros((0, self.bundle.num_classes), np.float32)
        return np.concatenate([self.backend.run_full(x[sl]) for sl in self._chunks(len(x))])

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> GatedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
