"""In-process continuous batching: many client threads sending small requests to a
``GatedPool`` (gated) and to a ``GatedPool(full=True)`` (the ungated model, same batching).
``gated-shared``: the gated pool in a child process that called ``share_thread_pool`` (every
session on one spinning pool; process-wide, hence its own process), its clients in that
process too; the processes take turns.

For each client count and request size, closed-loop clients send requests for a fixed time;
the two pools are measured alternately (``--rounds`` each) and the throughput ratio is taken
per round. The ideal speed-up of the exit mix is the one ``dgconvert bench`` reports at the
pool's batch size: full time / sum over exits of the ungated prefix time (the physical
limit) and the FLOPs share.

    .venv/bin/python benchmarks/pool_throughput.py [BUNDLE] [--clients 1,8,32] [--sizes 1,8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _util import DEFAULT_BUNDLE, TEST_DATA, header, require, write_results

from dgconvert.bench import BenchConfig, run_benchmark
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedPool


def _closed_loop(pool: GatedPool, images: np.ndarray, clients: int, size: int,
                 seconds: float) -> tuple[float, list[float]]:
    """Requests/s and per-request latencies (ms) of ``clients`` threads for ``seconds``."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    lat: list[list[float]] = [[] for _ in range(clients)]

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        while time.perf_counter() < stop:
            rows = rng.integers(0, len(images) - size)
            t0 = time.perf_counter()
            pool.predict(images[rows:rows + size], timeout=60)
            lat[i].append(1e3 * (time.perf_counter() - t0))
            counts[i] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t0), [v for li in lat for v in li]


def _shared_child(conn: Any, bundle: str, images: np.ndarray, max_batch: int,
                  max_delay_ms: float) -> None:
    """The gated pool on one shared thread pool, answering closed-loop runs."""
    from dgconvert.runtime import share_thread_pool

    share_thread_pool()
    with GatedPool(bundle, max_batch=max_batch, max_delay_ms=max_delay_ms,
                   backend="onnxruntime") as pool:
        conn.send(pool.runner.backend.describe())
        while (msg := conn.recv()) is not None:
            conn.send(_closed_loop(pool, images, *msg))
        conn.send({"rows_per_stage": pool.stats, "mean_batch": float(np.mean(pool.batch_sizes))})


class SharedPool:
    """The child process of ``_shared_child`` as the loop below uses a pool."""

    def __init__(self, bundle: Path, images: np.ndarray, max_batch: int,
                 max_delay_ms: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, there = ctx.Pipe()
        self._proc = ctx.Process(target=_shared_child, daemon=True,
                                 args=(there, str(bundle), images, max_batch, max_delay_ms))
        self._proc.start()
        self.describe = self._conn.recv()

    def closed_loop(self, clients: int, size: int, seconds: float) -> tuple[float, list[float]]:
        self._conn.send((clients, size, seconds))
        return self._conn.recv()

    def close(self) -> dict[str, Any]:
        self._conn.send(None)
        stats = self._conn.recv()
        self._proc.join(30)
        return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--sizes", default="1,8")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--stem", default="pool_throughput")
    args = ap.parse_args()
    bundle = Bundle.load(require(args.bundle, "bundle"))
    images = load_dataset(args.data).images
    # the ideal speed-up of this exit mix, from the bench harness at the pool's batch size
    rep = run_benchmark(bundle, images[:2048], config=BenchConfig(
        batch_sizes=[args.max_batch], repeats=3, samples=2048, progress=False),
        backend="onnxruntime")
    gated = rep.result("gated", args.max_batch)
    full = rep.result("full", args.max_batch)
    limit_speedup = full.ms.median / (gated.ideal_prefix_ms_per_image or float("nan"))
    flops_speedup = 1.0 / (gated.cost_share_flops or float("nan"))
    rows: list[dict[str, Any]] = []
    pools = {"gated": GatedPool(bundle, max_batch=args.max_batch,
                                max_delay_ms=args.max_delay_ms, backend="onnxruntime"),
             "full": GatedPool(bundle, max_batch=args.max_batch,
                               max_delay_ms=args.max_delay_ms, full=True, backend="onnxruntime"),
             # full.onnx with ORT's default thread settings (spinning on), same batching:
             # what a user would serve instead
             "full-default": GatedPool(bundle, max_batch=args.max_batch,
                                       max_delay_ms=args.max_delay_ms, full=True,
                                       backend="onnxruntime", spinning=True)}
    shared = SharedPool(bundle.path, images, args.max_batch, args.max_delay_ms)
    names = [*pools, "gated-shared"]
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            for size in (int(s) for s in args.sizes.split(",")):
                rps: dict[str, list[float]] = {n: [] for n in names}
                lats: dict[str, list[float]] = {n: [] for n in names}
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        v, lat = (shared.closed_loop(clients, size, args.seconds)
                                  if name == "gated-shared" else
                                  _closed_loop(pools[name], images, clients, size, args.seconds))
                        rps[name].append(v)
                        lats[name] += lat
                        time.sleep(0.2)  # spinning workers go idle before the next pool
                ratios = [g / f for g, f in zip(rps["gated"], rps["full"], strict=True)]
                ratio = statistics.median(ratios)
                vs_default = statistics.median(
                    g / f for g, f in zip(rps["gated"], rps["full-default"], strict=True))
                shared_vs_default = statistics.median(
                    g / f for g, f in zip(rps["gated-shared"], rps["full-default"], strict=True))
                rows.append({
                    "shared_images_per_s": statistics.median(rps["gated-shared"]) * size,
                    "shared_vs_default": shared_vs_default,
                    "shared_of_limit_speedup": statistics.median(
                        g / f for g, f in zip(rps["gated-shared"], rps["full"], strict=True))
                    / limit_speedup,
                    "shared_p99_ms": float(np.percentile(lats["gated-shared"], 99)),
                    "full_default_images_per_s": statistics.median(rps["full-default"]) * size,
                    "speedup_vs_default": vs_default,
                    "full_default_p99_ms": float(np.percentile(lats["full-default"], 99)),
                    "clients": clients, "request_size": size,
                    "gated_images_per_s": statistics.median(rps["gated"]) * size,
                    "full_images_per_s": statistics.median(rps["full"]) * size,
                    "speedup": ratio, "speedup_min": min(ratios), "speedup_max": max(ratios),
                    "of_limit_speedup": ratio / limit_speedup,
                    "of_flops_speedup": ratio / flops_speedup,
                    "gated_p50_ms": float(np.percentile(lats["gated"], 50)),
                    "gated_p99_ms": float(np.percentile(lats["gated"], 99)),
                    "full_p50_ms": float(np.percentile(lats["full"], 50)),
                    "full_p99_ms": float(np.percentile(lats["full"], 99)),
                })
                print(rows[-1], flush=True)
        stats = {name: {"rows_per_stage": p.stats, "mean_batch": float(np.mean(p.batch_sizes))}
                 for name, p in pools.items()}
    finally:
        for p in pools.values():
            p.close()
        stats["gated-shared"] = shared.close()
    md = [header("GatedPool: continuous batching across client threads", [
        f"bundle: {bundle.path.name}, thresholds {bundle.thresholds}, max_batch "
        f"{args.max_batch}, max_delay_ms {args.max_delay_ms}",
        f"exit mix at batch {args.max_batch}: ideal speed-up {limit_speedup:.2f}× (physical "
        f"limit: ungated prefixes) / {flops_speedup:.2f}× (FLOPs share); the runner measured "
        f"{gated.speedup.median:.2f}× there" if gated.speedup else "",
        f"rows per stage (gated pool): {stats['gated']['rows_per_stage']}, mean batch "
        f"{stats['gated']['mean_batch']:.1f}; full pool mean batch "
        f"{stats['full']['mean_batch']:.1f}"]),
        "full-default: a `GatedPool(full=True)` whose full.onnx session has ORT's default "
        "thread settings (spinning on), the same batching; gated-shared: the gated pool in a "
        f"process with one shared thread pool ({shared.describe}; mean batch "
        f"{stats['gated-shared']['mean_batch']:.1f})",
        "",
        "| clients | request | gated img/s | gated-shared img/s | full img/s | full-default "
        "img/s | gated / full-default | gated-shared / full-default | gated / full [min–max] | "
        "of limit speed-up (gated, shared) | of FLOPs speed-up | gated p50 / p99 ms | "
        "gated-shared p99 ms | full p50 / p99 ms | full-default p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['clients']} | {r['request_size']} | {r['gated_images_per_s']:,.0f} | "
                  f"{r['shared_images_per_s']:,.0f} | "
                  f"{r['full_images_per_s']:,.0f} | {r['full_default_images_per_s']:,.0f} | "
                  f"{r['speedup_vs_default']:.2f}× | **{r['shared_vs_default']:.2f}×** | "
                  f"{r['speedup']:.2f}× [{r['speedup_min']:.2f}–"
                  f"{r['speedup_max']:.2f}] | {r['of_limit_speedup']:.2f}, "
                  f"{r['shared_of_limit_speedup']:.2f} | "
                  f"{r['of_flops_speedup']:.2f} | {r['gated_p50_ms']:.2f} / "
                  f"{r['gated_p99_ms']:.2f} | {r['shared_p99_ms']:.2f} | "
                  f"{r['full_p50_ms']:.2f} / {r['full_p99_ms']:.2f} | "
                  f"{r['full_default_p99_ms']:.2f} |")
    write_results(args.stem, "\n".join(md), {"rows": rows, "limit_speedup": limit_speedup,
                                             "flops_speedup": flops_speedup, "pools": stats})


if __name__ == "__main__":
    main()
