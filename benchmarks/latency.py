"""Latency traffic (issue 24): the gated runtime against a default ONNX Runtime session on
``full.onnx`` and against the physical limit, at batch 1 to 256, per model and thread count.

For each model and thread setting, interleaved runs (:func:`dgconvert.bench.run_benchmark`)
time: the default session, the gated runner (paths chosen per batch size, measured at
load), the runner with every gate off, and the limit (ungated prefixes, the faster of
spinning off and on). Small batches and large ones are separate runs so that each gets a
sensible number of images per pass. Then the ``If`` cost: the batch-1 ``If`` graph vs the
stage sessions and the composed chain, at every exit, and with every image continuing.

    python benchmarks/latency.py BUNDLE=DATA=MIX [BUNDLE=DATA=MIX ...] [--threads 1,2]
        [--load] [--repeats 3] [--large 64,256]

``MIX``: percentages exiting at each gate (thresholds set on DATA, e.g. ``25,25,25``).
Writes ``results/latency.{md,json}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from _util import header, interleaved_rounds, write_results
from limit_sweep import busy_core, model_spec, summary

from dgconvert.bench import BenchConfig, no_exit_point, run_benchmark
from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import ExitRule, GatedResult
from dgconvert.runtime import GatedRunner

SMALL = [1, 2, 4, 8]


def _interleaved_us(fs: dict[str, Any], calls: int) -> dict[str, float]:
    """Median µs per call of each function, the functions called in turn (one warm-up)."""
    return {name: float(np.median(v)) for name, v in interleaved_rounds(fs, calls).items()}


def if_cost(bundle: Bundle, images: np.ndarray, threads: int, calls: int) -> list[dict]:
    """Batch 1, one image: µs of the If graph, the stage sessions and the composed chain
    with the exit forced at each gate, and with the image continuing through every gate
    (thresholds above every score: every If and head runs, nobody exits). The paths take
    turns call by call, so every session spins within a run only: two sessions that keep
    spinning after their runs would slow each other down here."""
    r = GatedRunner(bundle, backend="onnxruntime", threads=threads, paths="default",
                    alone_spinning="run")
    be = r.backend
    x = r.prepare(images[:1])
    k = bundle.num_gates
    full_if = be.in_graph_exits.full
    rows = []
    never = 3.0e38  # a gate that is on (its head and If run) but that no score reaches
    cases = [(f"exit at gate {j}", [never] * j + [-np.inf] + [never] * (k - j - 1))
             for j in range(k)]
    cases.append(("every gate on, nobody exits", [never] * k))
    res = GatedResult.empty(1)
    off = ExitRule.from_thresholds([np.inf] * k)
    be.single()(x, off)  # builds the graph without gates
    no_gates = be.in_graph_exits.variants[off.off]
    for what, t in cases:
        rule = ExitRule.from_thresholds(t)
        us = _interleaved_us({
            "if_us": lambda rule=rule: full_if.run(x, rule.exit_at),
            "stages_us": lambda rule=rule: r._predict_staged(x, res, 0, rule),
            "chain_us": lambda rule=rule: be.chain_session.run(x, rule.exit_at),
            "no_gates_us": lambda: no_gates.run(x, off.exit_at)}, calls)
        rows.append({"case": what, **us})
    r.close()
    return rows


def _if_table(rows: list[dict], k: int) -> str:
    on = next(r for r in rows if r["case"].startswith("every gate on"))
    per_gate = (on["if_us"] - on["no_gates_us"]) / k
    lines = ["| batch 1 | If graph µs | stage sessions µs | composed chain µs | "
             "no gates (full model) µs |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['if_us']:.0f} | {r['stages_us']:.0f} | {r['chain_us']:.0f} "
              f"| {r['no_gates_us']:.0f} |" for r in rows]
    lines += ["", f"If + gate head per gate (every gate on and nobody exits, minus the graph "
                  f"without gates, / {k}, same rounds): {per_gate:.1f} µs; If graph vs "
                  f"composed chain, nobody exits: {on['if_us'] - on['chain_us']:+.0f} µs"]
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    shared = any(r.get("shared_speedup_default") for r in rows)
    lines = ["| batch | default ORT ms | gated ms | gated / default (speed-up) | limit ms | "
             "efficiency vs limit | every gate off / default |"
             + (" gated-shared / default |" if shared else ""),
             "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if shared else "")]
    for r in rows:
        off_default = r["default_ms"] * r["nobody_exits_over_full"] / r["full_ms"]
        lines.append(
            f"| {r['batch_size']} | {r['default_ms']:.4f} | {r['gated_ms']:.4f} | "
            f"{r['speedup_default']:.2f}× | {r['limit_ms']:.4f} | {r['efficiency_limit']:.3f} | "
            f"{off_default:.2f}× |"
            + (f" {r.get('shared_speedup_default') or float('nan'):.2f}× |" if shared else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="BUNDLE=DATA=MIX (empty MIX: the bundle's thresholds)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--load", action="store_true", help="also beside one busy process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-samples", type=int, default=128,
                    help="images per timed pass at batch 1-8 (batch 64 and 256: 256)")
    ap.add_argument("--if-calls", type=int, default=50)
    ap.add_argument("--large", default="64,256",
                    help="the large batch sizes (e.g. 64 where 256 does not fit in memory)")
    ap.add_argument("--stem", default="latency")
    args = ap.parse_args()
    body, data = [], []
    for arg in args.models:
        spec = model_spec(arg, 1024)
        path, data_name, bundle, ds = spec.path, spec.data_name, spec.bundle, spec.data
        mix, thresholds, what = spec.mix, spec.thresholds, spec.what
        body += [f"## {Path(path).name} ({len(ds.images)} images of {data_name}; {what})", ""]
        for threads in (int(t) for t in args.threads.split(",")):
            for load in [False, True] if args.load else [False]:
                rows, describe, loads = [], "", []
                large = [int(v) for v in args.large.split(",") if v]
                for sizes, samples in ((SMALL, args.small_samples), (large, max([256, *large]))):
                    config = BenchConfig(batch_sizes=sizes, repeats=args.repeats,
                                         samples=samples, progress=False)
                    with busy_core(load):
                        report = run_benchmark(
                            bundle, ds.images, ds.labels, config=config, backend="onnxruntime",
                            thresholds=thresholds, operating_points=no_exit_point(bundle),
                            backend_options={"threads": threads}, data_name=data_name)
                    rows += summary(report)
                    describe = f"{report.backend['describe']}; paths: {report.backend['paths']}"
                    loads.append(report.machine.get("load_average_start"))
                    data.append({"bundle": path, "mix": mix, "threads": threads,
                                 "busy_process": load, "report": report.to_dict()})
                where = "beside one busy process" if load else "no extra process"
                body += [f"### {threads} thread(s), {where}", "",
                         f"backend: {describe}; load average at start of each run: {loads}",
                         "", _table(rows), ""]
                print("\n".join(body[-6:]), flush=True)
            cost = if_cost(bundle, ds.images, threads, args.if_calls)
            body += [f"### If cost, {threads} thread(s)", "", _if_table(cost, bundle.num_gates),
                     ""]
            data.append({"bundle": path, "threads": threads, "if_cost": cost})
            print("\n".join(body[-4:]), flush=True)
    md = header("Latency traffic: gated vs a default ONNX Runtime session (CPU)", [
        "gated / default = default ORT ms / gated ms (median of rounds, paired); limit = "
        "every image pays only the ungated prefix up to its exit, each prefix timed with the "
        "faster of spinning off and on; efficiency = limit / gated; every gate off / default "
        "= the runner with every threshold +inf against the default session",
        "targets (issue 24): gated >= 1.0x default at every batch size (>= 1.2x at batch 1 "
        "on ResNet-18/50); efficiency >= 0.90 at batch 1-8, >= 0.95 at >= 64; every gate off "
        ">= 0.97x default",
    ]) + "\n" + "\n".join(body)
    write_results(args.stem, md, _finite(data))


def _finite(obj: Any) -> Any:
    """JSON-safe: non-finite floats as None."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
