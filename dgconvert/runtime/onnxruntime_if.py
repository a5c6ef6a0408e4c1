"""In-graph exits (:mod:`dgconvert.runtime.passes.if_graph`) as ONNX Runtime sessions: one
per set of gates that are off, built on first use, self-checked against the stage chain
and cached."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dgconvert.core.contract import CONTRACT
from dgconvert.core.exits import ExitRule
from dgconvert.runtime.checks import close_to_reference
from dgconvert.runtime.fast_paths import FastPath
from dgconvert.runtime.passes.chain import THRESHOLDS, ChainError
from dgconvert.runtime.passes.if_graph import OUTPUTS

log = logging.getLogger(__name__)

#: ``(image [1, ...], thresholds [K]) -> (score, label, exit stage)``
Single = Callable[[np.ndarray, np.ndarray], tuple[np.float32, np.int64, int]]


class IfSession:
    """One composed ``If`` graph: ``run(image, exit_at) -> (score, label, exit stage)``
    (``exit_at``: :attr:`ExitRule.exit_at`, NaN where a gate is off). ``feeds``: more
    inputs of the session's graph (the branch of a one-call graph,
    :mod:`dgconvert.runtime.passes.one_call`)."""

    def __init__(self, session: Any, run: Any, run_options: Any,
                 off: frozenset[int] = frozenset(),
                 feeds: dict[str, np.ndarray] | None = None) -> None:
        self.session, self.off = session, off
        self._run, self._options = run, run_options
        self._input = session.get_inputs()[0].name
        self._feeds = dict(feeds or {})
        self._names = list(OUTPUTS)

    def run(self, image: np.ndarray, thresholds: np.ndarray) -> tuple[Any, Any, int]:
        score, label, stage = self._run(self._names, {self._input: image, THRESHOLDS: thresholds,
                                                      **self._feeds}, self._options)
        return score[0], label[0], int(stage[0])


def stage_chain_single(run_stage: Any, image: np.ndarray, thresholds: np.ndarray,
                       num_stages: int) -> tuple[Any, Any, int]:
    """The reference: ``image`` (one row) through the stage sessions, exit rule of
    :mod:`dgconvert.core.exits` (+inf off, NaN scores never exit)."""
    keep = np.zeros(1, np.int64)
    rule = ExitRule.from_thresholds(np.where(np.isnan(thresholds), np.inf, thresholds))
    out = run_stage(0, image, None)
    for k in range(num_stages - 1):
        if rule.exits(k, out.score[0]):
            return out.score[0], out.label[0], k
        out = run_stage(k + 1, out.features, keep)
    return out.score[0], out.label[0], num_stages - 1


def check_if(session: IfSession, run_stage: Any, images: np.ndarray, num_stages: int) -> None:
    """Compare ``session`` with the stage chain, image by image: an exit forced at every
    gate that is on (earlier gates +inf), every gate off, and thresholds at the images'
    median score per gate. Raises :class:`ChainError` on a mismatch or an ORT error."""
    k_gates = num_stages - 1
    on = [k for k in range(k_gates) if k not in session.off]
    cases: list[tuple[str, np.ndarray]] = []
    for j in on:
        t = np.full(k_gates, np.inf, np.float32)
        t[j] = -np.inf
        cases.append((f"an exit at gate {j}", t))
    cases.append(("every gate off", np.full(k_gates, np.inf, np.float32)))
    scores = np.array([[stage_chain_single(run_stage, images[i:i + 1], c[1], num_stages)[0]
                        for c in cases[:-1]] for i in range(len(images))], np.float32)
    if scores.size:  # each gate's median score: some images exit there, some continue
        median = np.full(k_gates, np.inf, np.float32)
        median[on] = np.median(scores, axis=0)
        cases.append(("thresholds at the median score", median))
    for what, t in cases:
        exit_at = ExitRule.from_thresholds(t).exit_at  # the graph's input: NaN where off
        for i in range(len(images)):
            image = images[i:i + 1]
            try:
                got = session.run(image, exit_at)
            except Exception as exc:  # noqa: BLE001 - ORT's own exception types
                raise ChainError(f"the If graph failed with {what}: {exc}") from exc
            want = stage_chain_single(run_stage, image, t, num_stages)
            if got[2] != want[2]:
                raise ChainError(f"image {i} left at stage {got[2]}, the stage chain at "
                                 f"{want[2]}, with {what}")
            for name, a, b in ((CONTRACT.score, want[0], got[0]), (CONTRACT.label, want[1], got[1])):
                why = close_to_reference(np.atleast_1d(a), np.atleast_1d(b), name)
                if why:
                    raise ChainError(f"image {i} {name} {why} from the stage chain with {what}")


#: ``open_graph(off) -> (session, run, feeds)``: the session of the If graph without the
#: gates in ``off``; raises :class:`ChainError` when it cannot be composed or loaded
OpenGraph = Callable[[frozenset[int]], tuple[Any, Any, dict[str, np.ndarray]]]


class InGraphExits:
    """The backend's batch-1 path: :class:`IfSession` per set of off gates (the set read
    from the thresholds: +inf or NaN), built and checked on first use; a set whose graph
    cannot be built uses the full one (off gates then computed), with a warning.
    ``open_graph`` composes and loads the graph for a set of off gates, the backend's way."""

    def __init__(self, open_graph: OpenGraph, run_stage: Any, run_options: Any,
                 num_stages: int, sample_shape: Sequence[int]) -> None:
        self._open, self._run_stage = open_graph, run_stage
        self._options, self.num_stages = run_options, num_stages
        rng = np.random.default_rng(2)
        self._check_images = rng.standard_normal((4, *sample_shape)).astype(np.float32)
        self._lock = threading.Lock()
        self.variants: dict[frozenset[int], IfSession] = {}
        #: set when a graph without some off gates could not be built
        self.variants_path: FastPath | None = None
        self.full = self._build(frozenset())  # raises ChainError

    def _build(self, off: frozenset[int]) -> IfSession:
        sess, run, feeds = self._open(off)
        ifs = IfSession(sess, run, self._options, off, feeds)
        check_if(ifs, self._run_stage, self._check_images, self.num_stages)
        self.variants[off] = ifs
        return ifs

    def __call__(self, image: np.ndarray, rule: ExitRule | np.ndarray) -> tuple[Any, Any, int]:
        rule = ExitRule.of(rule)
        ifs = self.variants.get(rule.off) or self._variant(rule.off)
        return ifs.run(image, rule.exit_at)

    def _variant(self, off: frozenset[int]) -> IfSession:
        with self._lock:
            if off not in self.variants:
                try:
                    self._build(off)
                except ChainError as exc:
                    self.variants[off] = self.full
                    self.variants_path = FastPath.failed("in-graph exits without off gates",
                                                         f"gates {sorted(off)} off: {exc}")
                    log.warning("onnxruntime: an If graph without the gates that are off "
                                "could not be built (they are computed): %s", exc)
            return self.variants[off]
