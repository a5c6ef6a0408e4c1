"""`GatedRunner`: chains the stage graphs and compacts the batch between them.

For a batch, stage 0 runs on every row; gate k's score decides who exits; only the rows
that continue are named in ``keep`` and gathered by the *next* stage graph's first op, so
exited samples never reach deeper stages and no stage runs when nobody reaches it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import InputError
from dgconvert.core.exits import ExitRule, GatedResult, GateRecords
from dgconvert.core.preprocess import make_normalizer, prepare_images
from dgconvert.runtime.backends import create_backend
from dgconvert.runtime.base import Backend
from dgconvert.runtime.paths import CHAIN, SINGLE, STAGES, PathChoice, measure_paths

#: the choice measured for a backend, shared by the runners on it (bench, pools)
_MEASURED: weakref.WeakKeyDictionary[Backend, PathChoice] = weakref.WeakKeyDictionary()

_KEEP_ONE = np.zeros(1, np.int64)  # keep = [0] for one continuing row (never written to)
_KEEP_ONE.flags.writeable = False


class GatedRunner:
    """Run a bundle with early exits on any batch size.

    ``backend`` is ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT engines for
    this GPU if built, else onnxruntime-gpu, else ONNX Runtime on the CPU). ``thresholds``
    default to the bundle's (calibrated) ones. Batches larger than ``max_batch`` are split.
    Extra keyword arguments go to the backend (e.g. ``threads=``, ``providers=``,
    ``compose=``).

    Which path a batch takes (:mod:`dgconvert.runtime.paths`): single images through the
    backend's in-graph exits (:meth:`Backend.single`), batches of at least
    ``chain_min_batch`` rows through its one-call chain (:meth:`Backend.chain`), the others
    stage by stage; with every gate off, the chain (the full model) at every size.
    ``paths``: a :class:`PathChoice`, ``"default"`` (batch 1 in-graph, chain from 2), or
    None: the bundle's tuned choice (``dgconvert bench --tune``) if it has one, else
    measured briefly now (``docs/runtime.md``).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        backend: str | Backend = "auto",
        thresholds: list[float] | None = None,
        max_batch: int | None = 256,
        paths: PathChoice | str | None = None,
        **backend_options: Any,
    ) -> None:
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
        self._sample_shape = tuple(self.bundle.input_shape)
        self._normalizer: Callable[[np.ndarray], np.ndarray] | None = None
        self._chain = self.backend.chain()  # one call for the whole chain, when offered
        self._single = self.backend.single()  # one call for one image, when offered
        self._paths = {SINGLE: self._predict_single, CHAIN: self._predict_chained,
                       STAGES: self._predict_staged}
        self.paths = self._choose_paths(paths)

    @property
    def chain_min_batch(self) -> int:
        """The smallest batch that takes the one-call chain (when the backend offers it)."""
        return self.paths.chain_min_batch

    def _choose_paths(self, paths: PathChoice | str | None) -> PathChoice:
        if isinstance(paths, PathChoice):
            return paths
        if paths not in (None, "default"):
            raise InputError(f"paths={paths!r}; expected a PathChoice, 'default' or None "
                             "(the bundle's tuned choice, else measured now)")
        stored = PathChoice.from_manifest(self.bundle.manifest.extra, str(self.bundle.path))
        if paths == "default" or (self._chain is None and self._single is None):
            return PathChoice()
        if stored is not None:
            return stored
        if self.backend not in _MEASURED:
            _MEASURED[self.backend] = self.measure_paths()
        return _MEASURED[self.backend]

    def measure_paths(self, images: Any = None, calls: int = 5,
                      source: str = "measured at load") -> PathChoice:
        """Time the paths this backend offers on ``images`` (default: 16 random rows) with
        each gate's threshold at their median score (about half exit at every gate); the
        choice (not applied: assign it to :attr:`paths`)."""
        if images is None:
            rng = np.random.default_rng(4)
            x = rng.standard_normal((16, *self._sample_shape)).astype(np.float32)
        else:
            x = self.prepare(images)[:16]
        rec = self._collect(x)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a gate whose scores are all NaN
            median = np.nanmedian(rec.scores, axis=0)
        t = ExitRule.from_thresholds(np.where(np.isnan(median), np.inf, median).astype(np.float32))
        res = GatedResult.empty(len(x))
        runs = {name: (lambda xb, f=f: f(xb, res, 0, t)) for name, f in self._paths.items()
                if (name != SINGLE or self._single is not None)
                and (name != CHAIN or self._chain is not None)}
        try:
            return measure_paths(runs, x, calls=calls, source=source)
        finally:
            self.reset_stats()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def thresholds(self) -> list[float]:
        return list(self._rule.thresholds)

    @thresholds.setter
    def thresholds(self, values: list[float] | None) -> None:
        t = self.bundle.thresholds if values is None else [float(v) for v in values]
        if len(t) != self.bundle.num_gates:
            raise InputError(
                f"got {len(t)} thresholds {t}; expected {self.bundle.num_gates} (one per gate)"
            )
        self._rule = ExitRule.from_thresholds(t)  # refuses NaN

    @property
    def exit_rule(self) -> ExitRule:
        """The exit rule of the current thresholds."""
        return self._rule

    @property
    def exit_thresholds(self) -> np.ndarray:
        """float32 thresholds as compared (``score >= t``): a gate that is off is NaN."""
        return self._rule.exit_at

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
        """Validate and normalize a batch (see :func:`dgconvert.core.preprocess.prepare_images`)."""
        if (type(images) is np.ndarray and images.dtype == np.uint8
                and images.shape[1:] == self._sample_shape and len(images)):
            return self._normalize_u8(images)
        return prepare_images(images, self.bundle.input_shape, self.bundle.normalization)

    def _normalize_u8(self, images: np.ndarray) -> np.ndarray:
        """:func:`dgconvert.core.preprocess.normalize` with its constants prepared once."""
        if self._normalizer is None:
            self._normalizer = make_normalizer(
                self.bundle.normalization, self._sample_shape[0], len(self._sample_shape) - 1
            )
        return self._normalizer(images)

    def predict(self, images: Any) -> GatedResult:
        """Labels, exit stages and scores for a batch, in the caller's order."""
        x = self.prepare(images)
        n = len(x)
        if n == 0:
            return GatedResult.empty()
        res = GatedResult.empty(n)
        for sl in self._chunks(n):
            self._predict_chunk(x[sl], res, sl.start)
        return res

    def path(self, n: int) -> str:
        """The path a batch of ``n`` rows takes now (:mod:`dgconvert.runtime.paths`)."""
        if self._chain is not None and self._rule.never_exits:
            return CHAIN  # the composed full model, no heads: fastest at every size
        return self.paths.path(n, self._single is not None, self._chain is not None)

    def predict_prepared(self, x: np.ndarray) -> GatedResult:
        """:meth:`predict` for a batch already through :meth:`prepare` (one chunk: at most
        ``max_batch`` rows when that is set)."""
        res = GatedResult.empty(len(x))
        self._predict_chunk(x, res, 0)
        return res

    def _predict_chunk(self, x: np.ndarray, res: GatedResult, offset: int) -> None:
        self._paths[self.path(len(x))](x, res, offset, self._rule)

    def _predict_single(self, x: np.ndarray, res: GatedResult, offset: int,
                        rule: ExitRule) -> None:
        """One image in one call (in-graph exits)."""
        score, label, stage = self._single(x, rule)  # type: ignore[misc]
        res.labels[offset], res.scores[offset], res.exit_stage[offset] = label, score, stage
        self._add_counts([1] * (stage + 1))

    def _predict_staged(self, x: np.ndarray, res: GatedResult, offset: int,
                        rule: ExitRule) -> None:
        # Hot path (batch 1 pays it per image): few numpy calls per stage, one lock per chunk.
        last, run = self.bundle.num_stages - 1, self.backend.run_stage
        n = len(x)
        counts = [n] + [0] * last
        out = run(0, x, None)
        tests = rule.tests  # tests[k](score): gate k's exit decisions, one C call each
        if n == 1:  # batch 1: scalar decisions, no index arithmetic
            try:
                for k in range(1, last + 1):
                    score = out.score[0]
                    if tests[k - 1](score):
                        res.labels[offset], res.scores[offset] = out.label[0], score
                        res.exit_stage[offset] = k - 1
                        return
                    out = run(k, out.features, _KEEP_ONE)
                    counts[k] = 1
                res.labels[offset], res.scores[offset] = out.label[0], out.score[0]
                res.exit_stage[offset] = last
            finally:
                self._add_counts(counts)
            return
        rows = np.arange(offset, offset + n)  # caller rows of the current stage rows
        try:
            for k in range(1, last + 1):
                exits = tests[k - 1](out.score)  # inlined ExitRule.split
                keep = (~exits).nonzero()[0]
                if keep.size < n:
                    res.fill(rows[exits], out.label[exits], out.score[exits], k - 1)
                    if keep.size == 0:
                        return
                    rows = rows[keep]
                    n = keep.size
                if keep.dtype != np.int64:  # pragma: no cover - 32-bit platforms
                    keep = keep.astype(np.int64)
                out = run(k, out.features, keep)
                counts[k] = n
            res.fill(rows, out.label, out.score, last)
        finally:
            self._add_counts(counts)

    def _predict_chained(self, x: np.ndarray, res: GatedResult, offset: int,
                         rule: ExitRule) -> None:
        """The backend ran every stage in one call; map each stage's rows back to the caller's."""
        last = self.bundle.num_stages - 1
        outs = self._chain(x, rule)  # type: ignore[misc]
        if rule.never_exits:  # one composed model, no compaction: every row leaves last
            score, label = outs[last]
            sl = slice(offset, offset + len(x))
            res.labels[sl], res.scores[sl], res.exit_stage[sl] = label, score, last
            self._add_counts([len(x)] * len(outs))
            return
        rows, tests = np.arange(offset, offset + len(x)), rule.tests
        counts = [0] * len(outs)
        for k, out in enumerate(outs):
            counts[k] = len(rows)
            if out is None:  # a gate that is off: every row continues
                continue
            score, label = out
            if k == last:
                res.fill(rows, label, score, k)
                break
            exits = tests[k](score)
            res.fill(rows[exits], label[exits], score[exits], k)
            rows = rows[~exits]
        self._add_counts(counts)

    def _add_counts(self, counts: list[int]) -> None:
        with self._lock:
            for k, c in enumerate(counts):
                self._stats[k] += c

    def collect(self, images: Any) -> GateRecords:
        """Every gate's score and label and the final label for every sample (no exits):
        the calibration pass."""
        return self._collect(self.prepare(images))

    def _collect(self, x: np.ndarray) -> GateRecords:
        n, k_gates = len(x), self.bundle.num_gates
        scores = np.empty((n, k_gates), np.float32)
        labels = np.empty((n, k_gates), np.int64)
        final = np.empty(n, np.int64)
        for sl in self._chunks(n):
            m = sl.stop - sl.start
            keep = np.arange(m, dtype=np.int64)
            out = self.backend.run_stage(0, x[sl], None)
            for k in range(1, self.bundle.num_stages):
                scores[sl, k - 1] = out.score
                labels[sl, k - 1] = out.label
                out = self.backend.run_stage(k, out.features, keep)
            final[sl] = out.label
        return GateRecords(scores, labels, final)

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
