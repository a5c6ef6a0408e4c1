"""Where the gated runner's time over the physical limit goes (issue 24), one run, every
system interleaved per round (50 ms idle between systems, so no spinning pool slows the
next): the ungated prefix up to each exit (the limit's sessions, faster of spinning on
and off), the in-graph exits at batch 1 with the exit forced at each gate, the composed
full model (every gate off), the chain with every gate on and nobody exiting (heads and
compaction at full batch), the chain and the runner at the bundle's thresholds, and the
runner's Python per call (``predict`` on uint8 images minus the session call alone).

    PYTHONPATH=.:benchmarks python benchmarks/gate_overhead.py out/reference.dg \
        --data fashion-mnist:test --batch-size 1,8,64
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _util import TEST_DATA, header, write_results

from dgconvert.bench.systems import PrefixProbe
from dgconvert.core.exits import ExitRule
from dgconvert.data import load_dataset
from dgconvert.runtime.runner import GatedRunner

SETTLE_S = 0.05
NEVER = 1e30  # a threshold no score reaches: the gate is on, nobody exits
ON_UINT8 = "runner.predict (uint8 images)"  # the one system timed on the raw images


def timed(fn: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> float:
    """µs per image of ``fn`` over ``batches`` (one warm-up call after the idle pause)."""
    time.sleep(SETTLE_S)
    fn(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return (time.perf_counter() - t0) / sum(len(b) for b in batches) * 1e6


def systems(runner: GatedRunner, n: int) -> dict[str, Callable[[np.ndarray], object]]:
    """What is timed at batch size ``n`` (on prepared float32 batches unless named)."""
    k = runner.bundle.num_gates
    chain, single = runner.backend.chain(), runner.backend.single()
    off = ExitRule.from_thresholds([float("inf")] * k)
    never = ExitRule.from_thresholds([NEVER] * k)
    rule = runner.exit_rule
    out: dict[str, Callable[[np.ndarray], object]] = {}
    if chain is not None:
        out["full model (chain, every gate off)"] = lambda x: chain(x, off)
        out["chain, every gate on, nobody exits"] = lambda x: chain(x, never)
        if n > 1:
            out["chain, the bundle's thresholds"] = lambda x: chain(x, rule)
    if n == 1 and single is not None:
        for j in range(k):
            t = [NEVER] * k
            t[j] = -NEVER
            forced = ExitRule.from_thresholds(t)
            out[f"in-graph exits, exit at gate {j}"] = lambda x, r=forced: single(x, r)
        out["in-graph exits, every gate on, nobody exits"] = lambda x: single(x, never)
        out["in-graph exits, the bundle's thresholds"] = lambda x: single(x, rule)
    out["runner.predict_prepared"] = runner.predict_prepared
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: print)")
    args = ap.parse_args()
    images = load_dataset(args.data).images[:args.images]
    runner = GatedRunner(args.bundle, backend="onnxruntime", threads=args.threads)
    prefixes = PrefixProbe(runner, threads=args.threads)
    prepared = runner.prepare(images)
    lines = [header(f"Gate overhead: {args.bundle.name}, {args.threads} threads",
                    [f"{len(images)} images of {args.data}; thresholds {runner.thresholds}; "
                     f"median of {args.rounds} interleaved rounds, µs per image"])]
    data: dict[str, dict[str, float]] = {}
    for n in (int(v) for v in args.batch_size.split(",")):
        count = len(images) // n * n
        raw = [images[i:i + n] for i in range(0, count, n)]
        batches = [prepared[i:i + n] for i in range(0, count, n)]
        timers = {name: (fn, batches) for name, fn in systems(runner, n).items()}
        timers[ON_UINT8] = (runner.predict, raw)
        res: dict[str, list[float]] = {name: [] for name in timers}
        limit: list[list[float]] = []
        for _ in range(args.rounds):
            for name, (fn, inputs) in timers.items():
                res[name].append(timed(fn, inputs))
            prefixes.reset()
            time.sleep(SETTLE_S)  # the runner's one session spins after its last call
            prefixes.run_all(raw, SETTLE_S)
            limit.append([s / count * 1e6 for s in prefixes.seconds])
        med = {name: float(np.median(v)) for name, v in res.items()}
        prefix = np.median(np.array(limit), axis=0)
        for k, v in enumerate(prefix):
            med[f"ungated prefix up to exit {k} (limit's session)"] = float(v)
        preparing = np.median(np.array(res[ON_UINT8]) - np.array(res["runner.predict_prepared"]))
        med["predict on uint8 minus predict_prepared (preparing, splitting), paired"] = float(
            preparing)
        share = runner.predict(images[:count]).exit_histogram(runner.bundle.num_stages) / count
        med["limit (exit mix x prefixes)"] = float(share @ prefix)
        med["efficiency vs the limit (runner.predict)"] = (
            med["limit (exit mix x prefixes)"] / med[ON_UINT8])
        data[str(n)] = med
        lines += [f"## batch {n} (exits per stage {np.round(share * 100, 1).tolist()} %)", "",
                  "| system | µs per image |", "|---|---:|"]
        lines += [f"| {name} | {v:.3f} |" if name.startswith("efficiency") else
                  f"| {name} | {v:.1f} |" for name, v in sorted(med.items())]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        write_results(f"gate_overhead_{args.bundle.stem}", text, data, args.out)


if __name__ == "__main__":
    main()
