"""Batch-size sweep on the Fashion-MNIST reference model: the full model, the gated staged
runner (ours), and — with the gated PyTorch checkpoint — PyTorch eager full and the naive
masked gated model, side by side in one run.

Thresholds: calibrated for at most ``--drop`` points (default 0.3) below the full model on
``fashion-mnist:train[50000:]`` when ``dgconvert.calibrate`` is there, else the bundle's.

    python benchmarks/batch_sweep.py [out/reference.dg] [--model out/gated.pt] [--batch-size 1,8,64,256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _util import (
    CALIBRATION_DATA,
    DEFAULT_BUNDLE,
    DEFAULT_MODEL,
    RESULTS,
    TEST_DATA,
    header,
    require,
    write_results,
)

from dgconvert.bench import (
    NO_EXIT,
    BenchConfig,
    calibrated_points,
    no_exit_point,
    point_name,
    run_benchmark,
)
from dgconvert.bench.operating import calibration_available
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="gated PyTorch checkpoint ('none' to skip the PyTorch systems)")
    ap.add_argument("--batch-size", default="1,8,64,256")
    ap.add_argument("--drop", type=float, default=0.3, help="max accuracy drop, in points")
    ap.add_argument("--calibration-data", default=CALIBRATION_DATA)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--torch-samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stem", default="batch_sweep")
    args = ap.parse_args()
    bundle = Bundle.load(require(args.bundle, "bundle"))
    model = None if str(args.model) == "none" else require(args.model, "gated checkpoint")
    test = load_dataset(args.data, num_classes=bundle.num_classes)
    thresholds, note, details = bundle.thresholds, "the bundle's thresholds", {}
    if calibration_available():
        cal = load_dataset(args.calibration_data, num_classes=bundle.num_classes)
        points, details = calibrated_points(bundle, cal.images, cal.require_labels("calibration"),
                                            [args.drop])
        thresholds = points[point_name(args.drop)]
        note = (f"thresholds calibrated for at most {args.drop:g} points below the full model "
                f"on {args.calibration_data}")
    print(note, file=sys.stderr)
    config = BenchConfig(batch_sizes=[int(v) for v in args.batch_size.split(",")],
                         repeats=args.repeats, samples=args.samples,
                         torch_samples=args.torch_samples)
    rep = run_benchmark(bundle, test.images, test.labels, config=config, backend="onnxruntime",
                        threads=args.threads, thresholds=thresholds, model=model,
                        operating_points=no_exit_point(bundle), data_name=args.data)
    summary = ["| batch | full ms/img | gated ms/img | speed-up | efficiency (time / FLOPs) "
               "| nobody exits / full | torch full ms/img | torch masked ms/img "
               "| masked vs torch full |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in rep.batch_sizes:
        f, g = rep.result("full", b), rep.result("gated", b)
        z = rep.result(f"gated[{NO_EXIT}]", b)
        tf = tm = None
        if model is not None:
            tf, tm = rep.result("torch-full", b), rep.result("torch-masked", b)
        summary.append(
            f"| {b} | {f.ms.median:.4f} | {g.ms.median:.4f} | {g.speedup.median:.2f}× | "
            f"{g.efficiency.median:.3f} / {g.efficiency_flops.median:.3f} | "
            f"{1 / z.speedup.median:.3f} | "
            + (f"{tf.ms.median:.4f} | {tm.ms.median:.4f} | {tm.speedup.median:.2f}× |"
               if tf and tm else "– | – | – |"))
    md = [header("Batch-size sweep on the Fashion-MNIST reference model", [
        f"bundle: `{args.bundle}`; PyTorch model: `{model}`; data {args.data} ({len(test)} images)",
        note, f"backend: {rep.backend['describe']}",
        f"timing: {args.repeats} interleaved repeats after 1 warm-up; {args.samples} images "
        f"per pass ({args.torch_samples} for PyTorch)",
    ]), "## summary", "", *summary, "",
        "*nobody exits / full*: the gated runner with every gate off (`gated[nobody exits]`) "
        "against the full model in the same rounds — the staging overhead itself (compaction "
        "copies, gate heads, session calls); 1.000 would be free.", "",
        "## all measurements", "", rep.markdown()]
    write_results(args.stem, "\n".join(md), {"calibration": details, **rep.to_dict()})
    rep.plot(RESULTS / f"{args.stem}.png")


if __name__ == "__main__":
    main()
