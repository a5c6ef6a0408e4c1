"""Benchmark of the threshold search on synthetic gate records.

    .venv/bin/python benchmarks/search_speed.py [--gates 4] [--samples 50000] [--seed 0]

Each gate's correctness rises with its depth and its score is informative (correct
samples score higher, on a per-gate scale). Prints wall and CPU seconds of :func:`search`
(all samples) and of :func:`calibrate` (30 % held out, frontier and selection included), and the search's
result next to the sequential and shared choices. (The search is internal to
:func:`dgconvert.calibrate.calibrate`; this script times it directly.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dgconvert.calibrate import GateRecords, calibrate
from dgconvert.calibrate.search import search


def synthetic(
    gates: int, samples: int, seed: int, classes: int = 10
) -> tuple[GateRecords, np.ndarray, np.ndarray]:
    """Records, ground truth and FLOP-like exit costs of a plausible gated network."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, samples)
    difficulty = rng.normal(size=samples)
    acc = np.linspace(0.55, 0.93, gates + 1)
    logit = np.log(acc / (1 - acc))[None, :] - 1.5 * difficulty[:, None]
    right = rng.random((samples, gates + 1)) < 1 / (1 + np.exp(-logit))
    wrong = (y[:, None] + rng.integers(1, classes, (samples, gates + 1))) % classes
    labels = np.where(right, y[:, None], wrong)
    scale = rng.uniform(0.5, 3.0, gates)
    scores = scale * (
        right[:, :gates] + rng.normal(0, 0.8, (samples, gates)) - 0.3 * difficulty[:, None]
    )
    costs = np.cumsum(rng.uniform(0.5, 1.5, gates + 1)) * 1e9
    return GateRecords(scores.astype(np.float32), labels[:, :gates], labels[:, gates]), y, costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gates", type=int, default=4)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop", type=float, default=0.01, help="accuracy drop below the full model")
    args = ap.parse_args()
    rec, y, costs = synthetic(args.gates, args.samples, args.seed)
    full = float(np.mean(rec.final_labels == y))
    wall, cpu = time.perf_counter(), time.process_time()
    res = search(rec, y, costs, target_accuracy=full - args.drop)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kind = "exact" if res.exact else "heuristic"
    print(
        f"{args.gates} gates x {args.samples} samples: search {wall:.2f} s wall, {cpu:.2f} s CPU ({kind})"
    )
    wall2, cpu2 = time.perf_counter(), time.process_time()
    calibrate(rec, y, costs, max_drop=args.drop)
    wall2, cpu2 = time.perf_counter() - wall2, time.process_time() - cpu2
    print(f"  calibrate (holdout 0.3, frontier, selection): {wall2:.2f} s wall, {cpu2:.2f} s CPU")
    for c in (res.full, res.best, res.sequential, res.shared):
        o = c.outcome
        print(
            f"  {c.method:<11} acc {o.accuracy:.4f} cost {o.cost_fraction:.4f} "
            f"feasible {c.feasible} exits {np.round(o.exit_fractions, 3).tolist()}"
        )


if __name__ == "__main__":
    main()
