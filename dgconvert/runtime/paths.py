"""Which path a batch takes, by its size: the in-graph exits (one image, one call), the
composed chain (one call, compaction inside) or the stage sessions (a call per stage
reached).

The crossover depends on the model and the machine, so it is measured: briefly when a
runner is created (:func:`measure_paths`, median thresholds on random rows, the paths
interleaved), or by ``dgconvert bench --tune``, which writes the choice into the bundle's
manifest (``manifest.extra["runtime_paths"]``) so runners read it instead of measuring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dgconvert.core.errors import BundleError

#: the manifest entry (``manifest.extra``) ``bench --tune`` writes
MANIFEST_KEY = "runtime_paths"
SINGLE, CHAIN, STAGES = "in-graph exits", "chain", "stages"
#: batch sizes measured for the chain / stages crossover; larger ones take the chain
TUNE_SIZES = (2, 4, 8, 16)
#: the stage sessions must beat a one-call path by this fraction to be chosen: the
#: measurement is short, and on a loaded machine its noise exceeds the paths' difference
#: (ResNet-18 at batch 1 once measured "stages" by 1 %); a one-call path varies less
MARGIN = 0.05


@dataclass(frozen=True)
class PathChoice:
    """Batch 1 through the in-graph exits when ``single``; batches of ``chain_min_batch``
    rows or more through the composed chain; the others stage by stage (each when the
    backend offers it). ``source`` says where the choice came from; ``timings`` what was
    measured (µs per batch, by path and size)."""

    single: bool = True
    chain_min_batch: int = 2
    source: str = "default"
    timings: dict[str, dict[int, float]] = field(default_factory=dict, compare=False)

    def path(self, n: int, has_single: bool, has_chain: bool) -> str:
        """The path for a batch of ``n`` rows given what the backend offers."""
        if n == 1 and self.single and has_single:
            return SINGLE
        if has_chain and n >= self.chain_min_batch:
            return CHAIN
        return STAGES

    def describe(self) -> str:
        one = SINGLE if self.single else "stages"
        return (f"batch 1: {one}; chain from batch {self.chain_min_batch} ({self.source})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = {p: {str(n): v for n, v in t.items()} for p, t in self.timings.items()}
        return d

    @classmethod
    def from_manifest(cls, extra: dict[str, Any], where: str) -> PathChoice | None:
        """The choice stored in a manifest's ``extra`` (None when there is none)."""
        obj = extra.get(MANIFEST_KEY)
        if obj is None:
            return None
        single, cmb = (obj.get("single"), obj.get("chain_min_batch")) if isinstance(
            obj, dict) else (None, None)
        if not isinstance(single, bool) or not isinstance(cmb, int) or cmb < 2:
            raise BundleError(
                f"{where}: {MANIFEST_KEY} is {obj!r:.120}; expected {{'single': true/false, "
                "'chain_min_batch': an integer >= 2}. Fix: rerun `dgconvert bench MODEL.dg "
                "--tune`, or delete the entry")
        return cls(single, cmb, f"tuned: {obj.get('source', 'bench --tune')}")


Run = Callable[[np.ndarray], Any]


def _median_us(run: Run, x: np.ndarray, calls: int) -> float:
    clock = time.perf_counter
    ts = []
    for _ in range(calls):
        t0 = clock()
        run(x)
        ts.append(clock() - t0)
    return float(np.median(ts)) * 1e6


def measure_paths(runs: dict[str, Run], images: np.ndarray, sizes: Sequence[int] = TUNE_SIZES,
                  calls: int = 5, source: str = "measured at load") -> PathChoice:
    """Time the paths in ``runs`` (by name: :data:`SINGLE`, :data:`CHAIN`, :data:`STAGES`;
    each runs a batch) interleaved on ``images``: batch 1 image by image over the first
    rows (in-graph exits vs stages), then ``sizes`` (chain vs stages) until the chain wins
    (a one-call path wins unless the stages are :data:`MARGIN` faster).
    """
    timings: dict[str, dict[int, float]] = {}
    single = SINGLE in runs
    if single and STAGES in runs:
        rows = images[:4]
        for name in (SINGLE, STAGES):  # warm up
            runs[name](rows[:1])
        per = {name: sum(_median_us(runs[name], rows[i:i + 1], calls) for i in range(len(rows)))
               / len(rows) for name in (SINGLE, STAGES)}
        for name, v in per.items():
            timings.setdefault(name, {})[1] = v
        single = per[SINGLE] <= per[STAGES] * (1 + MARGIN)
    cmb = 2
    if CHAIN in runs and STAGES in runs:
        cmb = max(sizes) * 2
        for n in sizes:
            x = images[:n]
            for name in (CHAIN, STAGES):
                runs[name](x)
            t = {name: _median_us(runs[name], x, calls) for name in (CHAIN, STAGES)}
            for name, v in t.items():
                timings.setdefault(name, {})[n] = v
            if t[CHAIN] <= t[STAGES] * (1 + MARGIN):
                cmb = n
                break
    return PathChoice(single, cmb, source, timings)
