"""The d-gate paper's Table 1 on the Fashion-MNIST reference model: thresholds, accuracy,
GFLOPs, FLOPs reduction, ms/image and speed-up at several operating points.

Thresholds are calibrated on ``fashion-mnist:train[50000:]`` (data neither the backbone
nor the gates were fitted on) for at most 0, 0.3, 1 and 2 points of accuracy below the full
model; accuracy and timings are measured on ``fashion-mnist:test``. Every operating point
and the full model are timed in the same interleaved run (``dgconvert.bench``).

    python benchmarks/paper_table.py [out/reference.dg] [--drops 0,0.3,1,2] [--batch-size 1,64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _util import CALIBRATION_DATA, DEFAULT_BUNDLE, TEST_DATA, header, require, write_results

from dgconvert.bench import BenchConfig, calibrated_points, run_benchmark
from dgconvert.bench.calibration import gate_costs_ms
from dgconvert.bench.operating import calibration_available
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--drops", default="0,0.3,1,2", help="max accuracy drops, in points")
    ap.add_argument("--batch-size", default="1,64", help="a table per batch size")
    ap.add_argument("--calibration-data", default=CALIBRATION_DATA)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cost", choices=["flops", "latency"], default="flops",
                    help="latency: also points calibrated on the gate and stage costs measured "
                         "at each batch size (gates that do not pay are off)")
    ap.add_argument("--stem", default="paper_table")
    args = ap.parse_args()
    bundle = Bundle.load(require(args.bundle, "bundle"))
    drops = [float(v) for v in args.drops.split(",")]
    sizes = [int(v) for v in args.batch_size.split(",")]
    test = load_dataset(args.data, num_classes=bundle.num_classes)
    if calibration_available():
        cal = load_dataset(args.calibration_data, num_classes=bundle.num_classes)
        points, details = calibrated_points(bundle, cal.images, cal.require_labels("calibration"),
                                            drops)
        note = (f"thresholds calibrated with dgconvert.calibrate on {args.calibration_data} "
                f"({details['calibration_images']} images; full model "
                f"{100 * details['full_accuracy']:.2f} % there)")
        if args.cost == "latency":
            details["latency"] = {}
            for size in sizes:
                costs = gate_costs_ms(bundle, cal.images, backend="onnxruntime",
                                      batch_size=size, threads=args.threads)
                timed, d = calibrated_points(bundle, cal.images, cal.labels, drops,
                                             gate_costs=costs)
                points.update({f"{name}, latency b{size}": t for name, t in timed.items()})
                details["latency"][size] = d
                print(f"batch {size}: gate costs {costs.to_dict()}", file=sys.stderr)
            note += ("; rows 'latency bN': calibrated on the stage and gate costs measured at "
                     "batch N (`calibrate --cost latency`: gates that do not pay are off)")
    else:
        points, details = {"bundle": bundle.thresholds}, {}
        note = "dgconvert.calibrate is not installed: the bundle's own thresholds only"
    print(note, file=sys.stderr)
    config = BenchConfig(batch_sizes=sizes, repeats=args.repeats, samples=args.samples)
    rep = run_benchmark(bundle, test.images, test.labels, config=config, backend="onnxruntime",
                        threads=args.threads, operating_points=points, data_name=args.data)
    md = [header("d-gate Table 1 on the Fashion-MNIST reference model", [
        f"bundle: `{args.bundle}`; accuracy and timings on {args.data} ({len(test)} images)",
        note,
        f"backend: {rep.backend['describe']}",
        f"timing: {args.repeats} interleaved repeats of {args.samples} images per system and "
        "batch size after 1 warm-up; medians; speed-up = median of per-repeat ratios to the "
        "full model",
    ])]
    for b in rep.batch_sizes:
        md += [f"## batch size {b}", "", rep.paper_table(b), ""]
        rows = [r for r in rep.results if r.batch_size == b and r.kind == "gated"]
        md += ["efficiency (ideal / measured; ideal = full ms × time share / FLOPs share): "
               + "; ".join(f"{r.system} {r.efficiency.median:.3f} / {r.efficiency_flops.median:.3f}"
                           for r in rows if r.efficiency and r.efficiency_flops), ""]
    md += ["## all measurements", "", rep.markdown()]
    write_results(args.stem, "\n".join(md), {"calibration": details, **rep.to_dict()})


if __name__ == "__main__":
    main()
