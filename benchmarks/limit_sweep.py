"""The gated runtime against the physical limit of early exit, per model and thread setting.

For each bundle and each ONNX Runtime spinning × threads setting, one interleaved
``run_benchmark``:
the full model (our tuned session and a default ONNX Runtime session), the gated runner,
the gated runner with every gate off (what staging costs), and the ungated prefixes up to
each exit (the physical limit). ``--load`` repeats each run beside one busy process that
competes for a core (what a loaded machine does to each setting).

    python benchmarks/limit_sweep.py [out/reference.dg] \\
        [--extra BUNDLE=DATA[=MIX]] [--spinning off,run] [--threads 0,1] [--load] \\
        [--batch-size 1,8,64,256]

``--extra``: another bundle and its images (a .npz works); ``MIX`` (e.g. ``25,25,25``):
thresholds set so that these percentages of the images exit at the gates (the rest at the
end) — for models with random weights, where only the exit mix matters for speed.
Writes ``results/limit_sweep.{md,json}``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _util import DEFAULT_BUNDLE, TEST_DATA, header, require, write_results

from dgconvert.bench import BenchConfig, no_exit_point, run_benchmark
from dgconvert.bench.measurements import FULL_DEFAULT
from dgconvert.bench.operating import NO_EXIT
from dgconvert.bench.shared_process import SHARED_GATED
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.onnxruntime_backend import SPINNING_NAMES


@dataclass
class ModelSpec:
    """A ``BUNDLE=DATA=MIX`` argument, loaded (see :func:`model_spec`)."""

    path: str
    data_name: str
    bundle: Bundle
    data: Any  # dgconvert.data.Dataset: the first images of DATA
    mix: list[float]  # percent exiting at each gate; empty: the bundle's thresholds
    thresholds: list[float]
    what: str  # the thresholds, in words


def model_spec(spec: str, images: int) -> ModelSpec:
    """``BUNDLE=DATA=MIX``: the bundle, the first ``images`` of DATA and the thresholds at
    which MIX percent exit at each gate on them (empty MIX: the bundle's own)."""
    path, data_name, mix_s = spec.split("=")
    bundle = Bundle.load(Path(path))
    ds = load_dataset(data_name, num_classes=bundle.num_classes).subset(slice(0, images))
    if mix_s:
        mix = [float(v) for v in mix_s.split(",")]
        thresholds = mix_thresholds(bundle, ds.images, mix)
        what = f"exit mix {mix} % at the gates"
    else:
        mix, thresholds = [], list(bundle.thresholds)
        what = f"the bundle's thresholds {[round(t, 4) for t in thresholds]}"
    return ModelSpec(path, data_name, bundle, ds, mix, thresholds, what)


def mix_thresholds(bundle: Bundle, images: np.ndarray, mix: Sequence[float]) -> list[float]:
    """Thresholds at which ``mix[j]`` percent of ``images`` exit at gate ``j``."""
    scores = GatedRunner(bundle, backend="onnxruntime").collect(images).scores.astype(np.float64)
    alive = np.ones(len(scores), bool)
    out = []
    for j, pct in enumerate(mix):
        want = int(round(pct / 100 * len(scores)))
        s = np.sort(scores[alive, j])[::-1]
        t = float(s[want - 1]) if want else float("inf")
        out.append(t)
        alive &= ~(scores[:, j] >= t)
    return out


def _spin_forever() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


@contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """One process spinning on a core while the block runs."""
    if not on:
        yield
        return
    proc = mp.get_context("spawn").Process(target=_spin_forever, daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
        proc.join()


def summary(report: Any) -> list[dict[str, Any]]:
    """Per batch size: the ratios the issue's targets name."""
    rows = []
    for b in report.batch_sizes:
        gated, off = report.result("gated", b), report.result(f"gated[{NO_EXIT}]", b)
        full, default = report.result("full", b), report.result(FULL_DEFAULT, b)
        rows.append({
            "batch_size": b,
            "full_ms": full.ms.median,
            "default_ms": default.ms.median,
            "gated_ms": gated.ms.median,
            "limit_ms": gated.ideal_prefix_ms_per_image,
            "speedup": gated.speedup.median if gated.speedup else None,
            "speedup_default": gated.speedup_default.median if gated.speedup_default else None,
            "efficiency_limit": gated.efficiency_prefix.median if gated.efficiency_prefix else None,
            "nobody_exits_over_full": off.speedup.median if off.speedup else None,
            "exits": gated.exit_histogram,
            **_shared(report, b),
        })
    return rows


def _shared(report: Any, b: int) -> dict[str, Any]:
    """The shared-pool runner's row (``gated-shared``), when the report has one."""
    try:
        shared = report.result(SHARED_GATED, b)
    except KeyError:
        return {}
    return {"shared_ms": shared.ms.median,
            "shared_speedup_default": (shared.speedup_default.median
                                       if shared.speedup_default else None)}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | full ms | default ORT ms | gated ms | limit ms | speed-up vs full "
             "(vs default ORT) | efficiency vs limit | every gate off / full |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['full_ms']:.4f} | {r['default_ms']:.4f} | "
            f"{r['gated_ms']:.4f} | {r['limit_ms']:.4f} | {r['speedup']:.2f}× "
            f"({r['speedup_default']:.2f}×) | {r['efficiency_limit']:.3f} | "
            f"{r['nobody_exits_over_full']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--extra", action="append", default=[],
                    help="BUNDLE=DATA[=MIX]: another model (MIX: exit percentages per gate)")
    ap.add_argument("--spinning", default="off,run")
    ap.add_argument("--threads", default="0",
                    help="intra-op threads per session, comma-separated (0: all usable cores)")
    ap.add_argument("--load", action="store_true", help="also beside one busy process")
    ap.add_argument("--batch-size", default="1,8,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=4096, help="images per data set")
    ap.add_argument("--stem", default="limit_sweep")
    args = ap.parse_args()
    models: list[tuple[Path, str, list[float] | None]] = [(args.bundle, args.data, None)]
    for spec in args.extra:
        parts = spec.split("=")
        mix = [float(v) for v in parts[2].split(",")] if len(parts) > 2 else None
        models.append((Path(parts[0]), parts[1], mix))
    config = BenchConfig(batch_sizes=[int(b) for b in args.batch_size.split(",")],
                         repeats=args.repeats, samples=args.samples)  # fmt: skip
    loads = [False, True] if args.load else [False]
    body, data = [], []
    for path, data_name, mix in models:
        bundle = Bundle.load(require(path, "bundle"))
        ds = load_dataset(data_name, num_classes=bundle.num_classes).subset(slice(0, args.limit))
        thresholds = mix_thresholds(bundle, ds.images, mix) if mix else bundle.thresholds
        how = (f"thresholds for a fixed exit mix {mix} % at the gates" if mix
               else "the bundle's calibrated thresholds")
        body += [f"## {path.name} on {data_name} ({len(ds.images)} images; {how})", ""]
        settings = [(load, spin, int(th)) for load in loads
                    for spin in args.spinning.split(",") for th in args.threads.split(",")]
        for load, spin, threads in settings:
            with busy_core(load):
                report = run_benchmark(
                    bundle, ds.images, ds.labels, config=config, backend="onnxruntime",
                    thresholds=thresholds, operating_points=no_exit_point(bundle),
                    backend_options={"spinning": SPINNING_NAMES[spin],
                                     "threads": threads or None},
                    data_name=data_name,
                )
            rows = summary(report)
            where = "beside one busy process" if load else "idle machine"
            body += [f"### spinning {spin}, {threads or 'all'} threads, {where}", "",
                     f"backend: {report.backend.get('describe')}; load average at start "
                     f"{report.machine.get('load_average_start')}", ""]
            body += [f"**warning: fast path off: {w}**"
                     for w in report.backend.get("fast_paths_off", [])]
            body += [_table(rows), ""]
            data.append({"bundle": str(path), "data": data_name, "mix": mix,
                         "thresholds": [t if np.isfinite(t) else None for t in thresholds],
                         "spinning": spin, "threads": threads or None,
                         "busy_process": load, "rows": rows,
                         "report": report.to_dict()})  # fmt: skip
            print("\n".join(body[-3:]), flush=True)
    md = header("The gated runtime against the physical limit (ONNX Runtime CPU)", [
        "one interleaved run per model × spinning × threads setting (× load): full = our tuned session on "
        "full.onnx; default ORT = `onnxruntime.InferenceSession(full.onnx)` with default options; "
        "limit = every image pays only the ungated prefix of the full model up to its exit "
        "(prefix graphs built from the bundle's stage graphs, timed in the same rounds); "
        "efficiency vs limit = limit / gated, paired per round; every gate off / full = the "
        "runner with every threshold at +inf over the full model (staging overhead)",
        "targets (issue 15): efficiency vs limit >= 0.95 at batch 64 and 256, >= 0.90 at 1 "
        "and 8; every gate off within 5 % of full at batch >= 8, 10 % at batch 1",
    ]) + "\n" + "\n".join(body)
    write_results(args.stem, md, {"runs": data})


if __name__ == "__main__":
    main()
