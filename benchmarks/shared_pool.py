"""One thread pool for all sessions (issue 24): the gated runner in a process that called
``share_thread_pool`` against a default ONNX Runtime session on ``full.onnx``, the runner
with a pool per session (the library's default) and the physical limit.

A shared pool is process-wide, and a default session needs a pool of its own, so the
shared-pool runner lives in a child process; the two processes take turns pass by pass
(interleaved rounds, an idle pause after each pass so that spinning workers stop), each
timing its own pass. Workloads: batch 1, 2, 4, 8, 64, 256, batch sizes 1-64 mixed in random
order (a server's traffic), and the same with every gate off. The limit: every image pays
only the ungated prefix up to its exit, each prefix session (a pool of its own, the faster of
spinning on and off) timed on the same batches in the same rounds.

    python benchmarks/shared_pool.py BUNDLE=DATA=MIX [BUNDLE=DATA=MIX ...] [--threads 2]
        [--rounds 7] [--load]

``MIX``: percentages exiting at each gate (thresholds set on DATA, e.g. ``25,25,25``; empty:
the bundle's thresholds). Writes ``results/shared_pool.{md,json}``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _util import header, write_results
from limit_sweep import busy_core, model_spec

from dgconvert.bench.systems import PrefixProbe
from dgconvert.core.bundle import Bundle
from dgconvert.runtime import GatedRunner

SIZES = [1, 2, 4, 8, 64, 256]
SETTLE_S = 0.2


def workloads(images: np.ndarray, small: int, large: int) -> dict[str, list[np.ndarray]]:
    """Name -> the batches of one pass."""
    out = {}
    for b in SIZES:
        n = small if b <= 8 else large
        out[f"batch {b}"] = [images[i:i + b] for i in range(0, n, b)]
    rng = np.random.default_rng(0)
    mixed, at = [], 0
    for s in rng.choice([1, 1, 1, 2, 4, 8, 64], 200):
        start = at % (len(images) - 64)
        mixed.append(images[start:start + s])
        at += s
    out["mixed 1-64"] = mixed
    return out


def _pass(f: Callable[[np.ndarray], Any], batches: list[np.ndarray]) -> float:
    """Seconds per image of one pass (after one warm-up call)."""
    f(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        f(b)
    return (time.perf_counter() - t0) / sum(len(b) for b in batches)


def child(conn: Any, bundle: str, thresholds: list[float], threads: int,
          loads: dict[str, list[np.ndarray]]) -> None:
    """The shared-pool process: answers ``(system, workload)`` with seconds per image."""
    from dgconvert.runtime import share_thread_pool

    share_thread_pool(threads)
    off = [float("inf")] * len(thresholds)
    systems = {"shared": GatedRunner(bundle, backend="onnxruntime", thresholds=thresholds),
               "shared, every gate off": GatedRunner(bundle, backend="onnxruntime",
                                                     thresholds=off)}
    conn.send(systems["shared"].backend.describe())
    while (msg := conn.recv()) is not None:
        name, load = msg
        conn.send(_pass(systems[name].predict, loads[load]))


def measure(bundle: Bundle, images: np.ndarray, thresholds: list[float], threads: int,
            rounds: int, small: int, large: int) -> dict[str, Any]:
    import onnxruntime as ort

    loads = workloads(images, small, large)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=child, args=(there, str(bundle.path), thresholds, threads, loads),
                       daemon=True)
    proc.start()
    shared_describe = here.recv()
    off = [float("inf")] * bundle.num_gates
    gated = GatedRunner(bundle, backend="onnxruntime", threads=threads, thresholds=thresholds)
    gated_off = GatedRunner(bundle, backend="onnxruntime", threads=threads, thresholds=off)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    default = ort.InferenceSession(str(bundle.full_file()), so,
                                   providers=["CPUExecutionProvider"])
    name = default.get_inputs()[0].name
    prepare = gated.prepare
    local = {"default": lambda x: default.run(None, {name: prepare(x)}),
             "per-session": gated.predict, "per-session, every gate off": gated_off.predict}
    remote = ["shared", "shared, every gate off"]
    prefixes = PrefixProbe(gated, threads=threads)
    results: dict[str, Any] = {}
    try:
        for load, batches in loads.items():
            systems = list(local) + remote
            s: dict[str, list[float]] = {k: [] for k in systems}
            limit_us: list[float] = []
            exits = _exit_shares(gated, batches, bundle.num_stages)
            for r in range(rounds):
                for k in systems[r % len(systems):] + systems[:r % len(systems)]:
                    if k in local:
                        s[k].append(_pass(local[k], batches))
                    else:
                        here.send((k, load))
                        s[k].append(here.recv())
                    time.sleep(SETTLE_S)
                prefixes.reset()
                prefixes.run_all(batches, settle_s=SETTLE_S)
                n = sum(len(b) for b in batches)
                limit_us.append(sum(f * t for f, t in zip(exits, prefixes.seconds, strict=True))
                                / n * 1e6)
                time.sleep(SETTLE_S)
            us = {k: statistics.median(v) * 1e6 for k, v in s.items()}
            paired = {k: statistics.median(d / g for d, g in zip(s["default"], s[k], strict=True))
                      for k in systems if k != "default"}
            results[load] = {"us_per_image": us, "over_default": paired,
                             "limit_us": statistics.median(limit_us), "exit_shares": exits}
            print(load, {k: round(v, 1) for k, v in us.items()},
                  {k: round(v, 3) for k, v in paired.items()},
                  "limit", round(results[load]["limit_us"], 1), flush=True)
    finally:
        here.send(None)
        proc.join(30)
        gated.close()
        gated_off.close()
    return {"shared_describe": shared_describe, "per_session_describe": gated.backend.describe(),
            "paths": str(gated.paths), "workloads": results}


def _exit_shares(runner: GatedRunner, batches: list[np.ndarray], stages: int) -> list[float]:
    """Share of the images exiting at each stage (the same for every system)."""
    hist = np.zeros(stages)
    for b in batches:
        hist += runner.predict(b).exit_histogram(stages)
    return (hist / hist.sum()).tolist()


def _table(res: dict[str, Any]) -> str:
    lines = ["| workload | default ORT µs/image | per-session µs | shared pool µs | shared / "
             "default | per-session / default | limit µs | shared: efficiency vs limit | "
             "every gate off / default: shared, per-session |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for load, r in res["workloads"].items():
        us, x = r["us_per_image"], r["over_default"]
        lines.append(
            f"| {load} | {us['default']:.1f} | {us['per-session']:.1f} | {us['shared']:.1f} | "
            f"**{x['shared']:.2f}×** | {x['per-session']:.2f}× | {r['limit_us']:.1f} | "
            f"{r['limit_us'] / us['shared']:.3f} | {x['shared, every gate off']:.2f}×, "
            f"{x['per-session, every gate off']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="BUNDLE=DATA=MIX (empty MIX: the bundle's thresholds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--small", type=int, default=256, help="images per pass at batch 1-8")
    ap.add_argument("--large", type=int, default=1024, help="images per pass at batch 64-256")
    ap.add_argument("--load", action="store_true", help="also beside one busy process")
    ap.add_argument("--stem", default="shared_pool")
    args = ap.parse_args()
    body, data = [], []
    for arg in args.models:
        spec = model_spec(arg, 2048)
        for load in [False, True] if args.load else [False]:
            with busy_core(load):
                res = measure(spec.bundle, spec.data.images, spec.thresholds, args.threads,
                              args.rounds, args.small, args.large)
            where = "beside one busy process" if load else "no extra process"
            body += [f"## {Path(spec.path).name}, {args.threads} threads, {where} ({spec.what})",
                     "",
                     f"- shared: {res['shared_describe']}",
                     f"- per-session: {res['per_session_describe']}; paths {res['paths']}", "",
                     _table(res), ""]
            data.append({"bundle": spec.path, "mix": spec.mix, "busy_process": load, **res})
            print("\n".join(body[-6:]), flush=True)
    md = header("One thread pool for every session vs a pool per session (CPU)", [
        f"{args.rounds} interleaved rounds, medians; X / default = default ORT µs / X µs, "
        "paired per round; the shared-pool runner runs in a child process (the processes "
        "take turns); limit = each image pays only the ungated prefix up to its exit",
    ]) + "\n" + "\n".join(body)
    write_results(args.stem, md, {"threads": args.threads, "runs": data})


if __name__ == "__main__":
    main()
