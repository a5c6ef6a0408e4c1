"""Which spinning the one-session paths should have (issue 24): the runner with its one-call
sessions (``If`` graph, composed chain, ``full.onnx``) spinning off, within runs ("run")
and on (ORT's default), against a default ONNX Runtime session on ``full.onnx``.

Two workloads, each interleaved over rounds in one process: single images back to back
(one path only), and batch sizes 1-64 mixed in random order (the ``If`` graph and the chain
alternate, as in a server). Optionally beside one busy process.

    python benchmarks/spinning.py [BUNDLE] [--data fashion-mnist:test] [--threads 2] [--load]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _util import DEFAULT_BUNDLE, TEST_DATA, header, require, write_results
from limit_sweep import busy_core

from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedRunner

SETTINGS = {"off": False, "run": "run", "on": True}


def _rounds(fs: dict[str, Callable[[np.ndarray], Any]], batches: list[np.ndarray],
            rounds: int) -> dict[str, float]:
    """Median µs per image of each function over ``rounds`` passes (the functions in turn,
    an idle pause after each so that spinning workers stop)."""
    n = sum(len(b) for b in batches)
    ts: dict[str, list[float]] = {k: [] for k in fs}
    for r in range(rounds):
        names = list(fs)[r % len(fs):] + list(fs)[:r % len(fs)]
        for k in names:
            f = fs[k]
            f(batches[0])
            t0 = time.perf_counter()
            for b in batches:
                f(b)
            ts[k].append((time.perf_counter() - t0) / n * 1e6)
            time.sleep(0.2)
    return {k: float(np.median(v)) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--load", action="store_true", help="also beside one busy process")
    ap.add_argument("--stem", default="spinning")
    args = ap.parse_args()
    import onnxruntime as ort

    bundle = Bundle.load(require(args.bundle, "bundle"))
    images = load_dataset(args.data, num_classes=bundle.num_classes).images[:2048]
    rng = np.random.default_rng(0)
    mixed, at = [], 0
    for s in rng.choice([1, 1, 1, 2, 4, 8, 64], 300):
        mixed.append(images[at % 1900:at % 1900 + s])
        at += s
    singles = [images[i:i + 1] for i in range(512)]
    runners = {k: GatedRunner(bundle, backend="onnxruntime", threads=args.threads,
                              alone_spinning=v) for k, v in SETTINGS.items()}
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    default = ort.InferenceSession(str(bundle.full_file()), so,
                                   providers=["CPUExecutionProvider"])
    prepare = runners["off"].prepare
    fs: dict[str, Callable[[np.ndarray], Any]] = {
        "default": lambda x: default.run(None, {default.get_inputs()[0].name: prepare(x)}),
        **{f"alone {k}": r.predict for k, r in runners.items()}}
    off = [float("inf")] * bundle.num_gates
    every_off = {  # every gate off: one session for every call
        "default": fs["default"],
        "alone off": GatedRunner(bundle, backend="onnxruntime", threads=args.threads,
                                 alone_spinning=False, thresholds=off).predict,
        "alone run": GatedRunner(bundle, backend="onnxruntime", threads=args.threads,
                                 alone_spinning="run", thresholds=off).predict,
        "alone on": GatedRunner(bundle, backend="onnxruntime", threads=args.threads,
                                thresholds=off).predict}  # the default policy spins here
    rows = []
    for load in [False, True] if args.load else [False]:
        with busy_core(load):
            for name, batches, funcs in (
                    ("single images back to back", singles, fs),
                    (f"{sum(map(len, mixed))} images in {len(mixed)} batches of 1-64, mixed",
                     mixed, fs),
                    ("every gate off, single images", singles, every_off),
                    ("every gate off, mixed", mixed, every_off)):
                us = _rounds(funcs, batches, args.rounds)
                rows.append({"workload": name, "busy_process": load, "us_per_image": us,
                             "speedup_vs_default": {k: us["default"] / v for k, v in us.items()
                                                    if k != "default"}})
                print(rows[-1], flush=True)
    for r in runners.values():
        r.close()
    lines = ["| workload | beside a busy process | default session µs/image | "
             + " | ".join(f"{k} (× default)" for k in fs if k != "default") + " |",
             "|---|---|---:|" + "---:|" * (len(fs) - 1)]
    for r in rows:
        lines.append(f"| {r['workload']} | {'yes' if r['busy_process'] else 'no'} | "
                     f"{r['us_per_image']['default']:.1f} | "
                     + " | ".join(f"{v:.2f}×" for v in r["speedup_vs_default"].values()) + " |")
    md = header("Spinning of the one-session paths vs a default ONNX Runtime session", [
        f"bundle: {bundle.path.name}, its thresholds {bundle.thresholds}; {args.threads} "
        f"threads (the default session: intra_op_num_threads={args.threads}, else default)",
        f"{args.rounds} interleaved rounds; medians; the stage sessions never spin; with every "
        "gate off the default policy spins (the column 'alone on')",
    ]) + "\n" + "\n".join(lines)
    write_results(args.stem, md, {"rows": rows, "threads": args.threads})


if __name__ == "__main__":
    main()
