"""The composed chain (:mod:`dgconvert.runtime.passes.chain`) as an ONNX Runtime session,
and its self-check against the per-stage sessions."""

from __future__ import annotations

from typing import Any

import numpy as np

from dgconvert.core.exits import ExitRule
from dgconvert.runtime.checks import close_to_reference
from dgconvert.runtime.passes.chain import THRESHOLDS, ChainError, output_names


class ChainSession:
    """Runs a composed chain: ``run(images, thresholds) -> [(score_k, label_k), ...]``;
    ``None`` for the stages whose gate is in ``off`` (composed without it). ``feeds``: more
    inputs of the session's graph (the branch of a one-call graph,
    :mod:`dgconvert.runtime.passes.one_call`)."""

    def __init__(self, session: Any, run: Any, run_options: Any, num_stages: int,
                 off: frozenset[int] = frozenset(),
                 feeds: dict[str, np.ndarray] | None = None) -> None:
        self.session, self.num_stages, self.off = session, num_stages, off
        self._run, self._options = run, run_options
        self._input = session.get_inputs()[0].name
        self._feeds = dict(feeds or {})
        self._names = [n for k in range(num_stages) if k not in off for n in output_names(k)]

    def run(self, images: np.ndarray, thresholds: np.ndarray) -> list[tuple[np.ndarray, ...] | None]:
        outs = iter(self._run(self._names, {self._input: images, THRESHOLDS: thresholds,
                                            **self._feeds}, self._options))
        return [None if k in self.off else (next(outs), next(outs))
                for k in range(self.num_stages)]


def check_chain(chain: ChainSession, run_stage: Any, images: np.ndarray) -> np.ndarray:
    """Compare ``chain`` with the per-stage ``run_stage`` on ``images``; return the thresholds
    used: each gate's median score, so about half the rows exit at every gate. Also runs
    nobody exiting and everybody exiting at the first gate (deeper stages get empty
    batches, which some optimized graphs cannot take). The chain's off gates never exit."""
    first = run_stage(0, images, None)
    cases = [_expected(run_stage, first, chain.num_stages, how, chain.off)
             for how in ("median", np.inf, -np.inf)]
    for what, t_arr, expected in cases:
        try:
            got = chain.run(images, t_arr)
        except Exception as exc:  # noqa: BLE001 - ORT's own exception types
            raise ChainError(f"the composed graph failed with {what}: {exc}") from exc
        for k, ((es, el), have_k) in enumerate(zip(expected, got, strict=True)):
            if have_k is None:
                continue
            gs, gl = have_k
            for name, expect, have in (("scores", es, gs), ("labels", el, gl)):
                why = close_to_reference(expect, have, name)
                if why:
                    raise ChainError(f"stage {k} {name} {why} from the per-stage graphs with "
                                     f"{what}")
    return cases[0][1]


def _expected(run_stage: Any, first: Any, n: int, how: Any,
              off: frozenset[int] = frozenset()) -> tuple[str, np.ndarray, list]:
    """The per-stage chain's ``(score, label)`` per stage, from stage 0's output ``first``,
    for thresholds ``how`` (a value for every gate, or ``"median"``; NaN for the gates in
    ``off``, given as compared: NaN); stages nobody reaches get empty arrays."""
    out = first
    thresholds, expected = [], [(out.score, out.label)]
    for k in range(1, n):
        if k - 1 in off:
            t = np.float32(np.inf)
        elif how == "median":
            s = np.sort(out.score)
            m = len(s) // 2  # midway between two scores: no row sits on the threshold
            t = np.float32((s[m - 1] + s[m]) / 2) if len(s) >= 2 else np.float32(0)
            t = np.float32(np.inf) if np.isnan(t) else t  # NaN scores: nobody exits
        else:
            t = np.float32(how)
        thresholds.append(t)
        _, keep = ExitRule.from_thresholds([t]).split(0, out.score)
        if keep.size == 0:  # the runner never runs an empty stage; the chain returns empties
            empty = (np.zeros(0, np.float32), np.zeros(0, np.int64))
            expected += [empty] * (n - k)
            thresholds += [t] * (n - 1 - len(thresholds))
            break
        out = run_stage(k, out.features, keep)
        expected.append((out.score, out.label))
    what = "thresholds at the median score" if how == "median" else f"thresholds {how}"
    return what, ExitRule.from_thresholds(thresholds).exit_at, expected
