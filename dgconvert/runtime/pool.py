"""`GatedPool`: continuous batching across requests, stage by stage.

Many small requests each leave a few survivors after every gate; run separately, every
stage would see tiny batches. The pool keeps one queue per stage and re-batches the
survivors of different requests before the next stage, so each stage runs at a batch size
near ``max_batch`` whatever the request size::

    submit(images) ─► queue 0 ─► stage 0 ─► exits fill their futures
                                   │ survivors (features + keep, per request)
                                   ▼
                     queue 1 ─► stage 1 (one batch from many requests) ─► ...

One worker thread runs the stages (ONNX Runtime's intra-op threads do the arithmetic). A
stage is due when its queue holds ``max_batch`` rows or its oldest row has waited
``max_delay_ms``; due stages run deepest first, so started requests finish. When no stage
is due the worker does not idle: it runs the shallowest queue that holds rows, so a lone
request is answered at once and the survivors waiting for a deeper stage are joined by
those of the batch just taken (batches still grow under load, from the rows that arrive
while a stage runs). ``wait_when_idle=True`` restores waiting: a stage then runs only
when due, as in a batcher with a queue delay. Survivors from
different batches are merged with :meth:`Backend.merge_features` (rows gathered into one
features handle on the backend's own device); backends that cannot merge run each
survivor group separately (still correct, less re-batching).

A stage-0 batch whose size the runner sends down a one-call path
(:mod:`dgconvert.runtime.paths`: in-graph exits for one image, the composed chain from its
measured crossover) runs all its stages in that call, like the runner would; the others go
stage by stage as above.

Backpressure: at most ``max_pending`` rows are in the pool; ``submit`` blocks until there
is room (``timeout`` seconds, then :class:`PoolFullError`). ``close()`` finishes every
request already submitted (``cancel=True`` fails them with :class:`PoolClosedError`
instead); none is lost or left hanging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import DGConvertError, InputError
from dgconvert.core.exits import ExitRule, GatedResult
from dgconvert.core.gates import exit_head_score
from dgconvert.runtime.paths import STAGES
from dgconvert.runtime.runner import GatedRunner

#: how many of the latest stage-run batch sizes a pool keeps (``batch_sizes``)
BATCH_HISTORY = 100_000

log = logging.getLogger(__name__)


class PoolClosedError(DGConvertError, RuntimeError):
    """The pool was closed: no new requests, and (with ``cancel=True``) pending ones fail."""


class PoolFullError(DGConvertError, RuntimeError):
    """``submit`` waited ``timeout`` seconds for room in a full pool."""


@dataclass
class _Request:
    result: GatedResult
    future: Future[GatedResult]
    remaining: int

    def finish_rows(self, rows: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    stage: int | np.ndarray) -> bool:
        """Record exits (at one stage, or one per row); True when the request is complete."""
        self.result.fill(rows, labels, scores, stage)  # type: ignore[arg-type]
        self.remaining -= len(rows)
        return self.remaining == 0


@dataclass
class _Segment:
    """Rows of one request waiting for a stage: its own row numbers, and where their
    input lies (images for stage 0; a features handle and the rows ``keep`` of it after)."""

    request: _Request
    rows: np.ndarray  # the request's row indices
    inputs: Any  # float32 images [m, ...] (stage 0) or a features handle
    keep: np.ndarray | None  # int64 rows of ``inputs`` (stage >= 1)
    since: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, n: int) -> tuple[_Segment, _Segment]:
        """The first ``n`` rows and the rest (same wait time)."""
        if self.keep is None:
            a = _Segment(self.request, self.rows[:n], self.inputs[:n], None, self.since)
            b = _Segment(self.request, self.rows[n:], self.inputs[n:], None, self.since)
        else:
            a = _Segment(self.request, self.rows[:n], self.inputs, self.keep[:n], self.since)
            b = _Segment(self.request, self.rows[n:], self.inputs, self.keep[n:], self.since)
        return a, b


class GatedPool:
    """Thread-safe continuous batching over a bundle (see the module docstring).

    ``full=True`` batches requests through ``full.onnx`` the same way: the baseline.
    ``wait_when_idle``: run a stage only when it is due (full or ``max_delay_ms`` old), even
    when the worker has nothing else to do. ``runner_options`` go to :class:`GatedRunner`
    (``backend``, ``thresholds``, ``threads``, ...).
    """

    def __init__(self, bundle: str | Path | Bundle, max_batch: int = 64,
                 max_delay_ms: float = 2.0, full: bool = False, max_pending: int = 4096,
                 wait_when_idle: bool = False, **runner_options: Any) -> None:
        if max_batch < 1 or max_delay_ms < 0 or max_pending < 1:
            raise ValueError(f"max_batch={max_batch}, max_delay_ms={max_delay_ms}, "
                             f"max_pending={max_pending}; expected >= 1, >= 0, >= 1")
        self.runner = GatedRunner(bundle, max_batch=None, **runner_options)
        limit = self.runner.backend.max_batch()
        self.max_batch = min(max_batch, limit) if limit else max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.full = full
        self.wait_when_idle = wait_when_idle
        self.max_pending = max_pending
        n = 1 if full else self.runner.bundle.num_stages
        self._queues: list[deque[_Segment]] = [deque() for _ in range(n)]
        self._queued = [0] * n
        self._pending = 0
        self._stats = [0] * self.runner.bundle.num_stages
        # sizes of the latest stage runs (bounded: a server runs for weeks) and their count
        self._batches: deque[int] = deque(maxlen=BATCH_HISTORY)
        self._batch_count = 0
        self._cond = threading.Condition()
        self._closing = self._cancelled = False
        self._worker = threading.Thread(target=self._loop, name="dgconvert-pool", daemon=True)
        self._worker.start()

    # -- the public side -------------------------------------------------------------------
    def submit(self, images: Any, timeout: float | None = None) -> Future[GatedResult]:
        """Queue a batch; its future resolves to the :class:`GatedResult` in its order."""
        x = self.runner.prepare(images)
        fut: Future[GatedResult] = Future()
        n = len(x)
        if n == 0:
            fut.set_result(GatedResult.empty())
            return fut
        if n > self.max_pending:
            raise InputError(f"a request of {n} images exceeds the pool's max_pending "
                             f"({self.max_pending}); split it or create the pool with a larger "
                             "max_pending")
        req = _Request(GatedResult.empty(n), fut, n)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closing and self._pending + n > self.max_pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolFullError(f"the pool holds {self._pending} rows (max_pending "
                                        f"{self.max_pending}); waited {timeout} s for room for "
                                        f"{n}. Fix: a larger max_pending, or fewer clients")
                self._cond.wait(left)
            if self._closing:
                raise PoolClosedError("the pool is closed; create a new GatedPool")
            self._pending += n
            self._push(0, _Segment(req, np.arange(n), x, None))
            self._cond.notify_all()
        return fut

    def predict(self, images: Any, timeout: float | None = None) -> GatedResult:
        """:meth:`submit` and wait for the result."""
        return self.submit(images).result(timeout)

    @property
    def stats(self) -> list[int]:
        """Rows each stage processed since the pool started."""
        with self._cond:
            return list(self._stats)

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of the batches the stages ran, in order (the latest ``BATCH_HISTORY``)."""
        with self._cond:
            return list(self._batches)

    def batch_sizes_since(self, start: int) -> tuple[list[int], int]:
        """For incremental readers: the sizes of the stage runs from the ``start``-th on
        (those still kept) and the ``start`` to pass next time."""
        with self._cond:
            first = self._batch_count - len(self._batches)
            return list(islice(self._batches, max(0, start - first), None)), self._batch_count

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish the submitted ones (``cancel``: fail them)."""
        with self._cond:
            self._closing = True
            self._cancelled = cancel
            self._cond.notify_all()
        self._worker.join(timeout)
        self.runner.close()

    def __enter__(self) -> GatedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------
    def _push(self, k: int, seg: _Segment) -> None:
        self._queues[k].append(seg)
        self._queued[k] += len(seg)

    def _pick(self, now: float) -> int | None:
        """The stage to run now (the deepest due one, else the shallowest with rows unless
        ``wait_when_idle``), or None."""
        flush = self._closing
        for k in range(len(self._queues) - 1, -1, -1):
            q = self._queues[k]
            if q and (flush or self._queued[k] >= self.max_batch
                      or now - q[0].since >= self.max_delay):
                return k
        if not self.wait_when_idle:
            for k, q in enumerate(self._queues):
                if q:
                    return k
        return None

    def _take(self, k: int) -> list[_Segment]:
        q, out, rows = self._queues[k], [], 0
        while q and rows < self.max_batch:
            seg = q.popleft()
            if rows + len(seg) > self.max_batch:
                seg, rest = seg.split(self.max_batch - rows)
                q.appendleft(rest)
            out.append(seg)
            rows += len(seg)
        self._queued[k] -= rows
        return out

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.perf_counter()
                    k = self._pick(now)
                    if k is not None:
                        break
                    if self._closing and not any(self._queues):
                        return
                    waits = [self.max_delay - (now - q[0].since) for q in self._queues if q]
                    self._cond.wait(max(min(waits), 1e-4) if waits else None)
                segs = self._take(k)
                cancelled = self._cancelled
            if cancelled:
                self._fail(segs, PoolClosedError("the pool was closed with cancel=True before "
                                                 "this request finished"))
                continue
            try:
                self._run(k, segs)
            except Exception as exc:  # noqa: BLE001 - the requests in the batch get it
                log.warning("pool: stage %d failed on a batch of %d rows: %s", k,
                            sum(map(len, segs)), exc)
                self._fail(segs, exc)

    def _fail(self, segs: Sequence[_Segment], exc: BaseException) -> None:
        with self._cond:
            for seg in segs:
                if not seg.request.future.done():
                    seg.request.future.set_exception(exc)
                self._pending -= len(seg)
            self._cond.notify_all()

    def _inputs(self, k: int, segs: list[_Segment]) -> list[tuple[Any, np.ndarray | None,
                                                                   list[_Segment]]]:
        """One or more (inputs, keep, segments) groups for stage ``k``."""
        if k == 0:
            x = segs[0].inputs if len(segs) == 1 else np.concatenate([s.inputs for s in segs])
            return [(x, None, segs)]
        by_source: dict[int, list[_Segment]] = {}
        for s in segs:
            by_source.setdefault(id(s.inputs), []).append(s)
        if len(by_source) == 1:
            return [(segs[0].inputs, np.concatenate([s.keep for s in segs]), segs)]
        merged = self.runner.backend.merge_features(
            [(s.inputs, s.keep) for s in segs])  # type: ignore[misc]
        if merged is not None:
            return [(merged, np.arange(sum(map(len, segs)), dtype=np.int64), segs)]
        return [(g[0].inputs, np.concatenate([s.keep for s in g]), g)
                for g in by_source.values()]

    def _run(self, k: int, segs: list[_Segment]) -> None:
        be = self.runner.backend
        for inputs, keep, group in self._inputs(k, segs):
            rows = sum(map(len, group))
            if k == 0 and not self.full and self.runner.path(rows) != STAGES:
                self._finish_whole(group, self.runner.predict_prepared(inputs))
                continue
            if self.full:
                logits = be.run_full(inputs)
                score = exit_head_score(logits, None, "max-softmax").astype(np.float32)
                label = logits.argmax(axis=1).astype(np.int64)
                features, last = None, True
            else:
                out = be.run_stage(k, inputs, keep)
                score, label, features = out.score, out.label, out.features
                last = k == len(self._queues) - 1
            self._after(k, group, score, label, features, last, rows)

    def _finish_whole(self, group: list[_Segment], res: GatedResult) -> None:
        """A stage-0 batch that ran every stage in one call (the runner's path for its
        size: in-graph exits or the composed chain)."""
        done: list[_Request] = []
        reached = ExitRule.reach(res.exit_histogram(len(self._stats)))
        with self._cond:
            for j, rows in enumerate(reached.tolist()):  # the stage batches the call ran
                if rows:
                    self._stats[j] += rows
                    self._batches.append(rows)
                    self._batch_count += 1
            at = 0
            for seg in group:
                sl = slice(at, at + len(seg))
                if seg.request.finish_rows(seg.rows, res.labels[sl], res.scores[sl],
                                           res.exit_stage[sl]):
                    done.append(seg.request)
                self._pending -= len(seg)
                at += len(seg)
            self._cond.notify_all()
        for req in done:
            req.future.set_result(req.result)

    def _after(self, k: int, group: list[_Segment], score: np.ndarray, label: np.ndarray,
               features: Any, last: bool, rows: int) -> None:
        rule = self.runner.exit_rule
        stage = self.runner.bundle.num_stages - 1 if self.full else k
        done: list[_Request] = []
        with self._cond:
            self._stats[0 if self.full else k] += rows
            self._batches.append(rows)
            self._batch_count += 1
            at = 0
            for seg in group:
                m = len(seg)
                s, lab = score[at:at + m], label[at:at + m]
                if last:
                    exits = np.ones(m, bool)
                else:
                    exits = rule.exits(k, s)
                if exits.any():
                    if seg.request.finish_rows(seg.rows[exits], lab[exits], s[exits], stage):
                        done.append(seg.request)
                    self._pending -= int(exits.sum())
                if not last and not exits.all():
                    cont = ~exits
                    keep = np.arange(at, at + m, dtype=np.int64)[cont]
                    self._push(k + 1, _Segment(seg.request, seg.rows[cont], features, keep,
                                               seg.since))
                at += m
            self._cond.notify_all()
        for req in done:
            req.future.set_result(req.result)
