"""INT8 on the CPU: the gated int8 runtime against ONNX Runtime's own quantization of the
full model and against the fp32 rows, in one interleaved run per model.

    python benchmarks/int8.py [out/reference.dg] [--extra BUNDLE=NPZ=25,25,25] \\
        [--calibration-data fashion-mnist:train[50000:]] [--batch-size 1,8,64,256]

Per fp32 bundle: ``quantize_bundle`` (calibration images from ``--calibration-data``, or the
extra model's own images), thresholds (the reference model: ``calibrate --max-drop 0.3``
against the fp32 source's full model; an extra model: thresholds for a fixed exit mix, e.g.
25 % per gate, for random weights), then one interleaved run of

- ``full-default``: the fp32 ``full.onnx`` in a default ONNX Runtime session;
- ``full-int8-default``: the int8 ``full.onnx`` (ORT's ``quantize_static``: QDQ, per-channel
  int8 weights, uint8 activations, MinMax) in a default session;
- ``full``: the int8 ``full.onnx`` in our tuned session; ``gated``: the int8 bundle (ours,
  every CPU fast path on: int8 boundaries, one-session chain, off gates);
- ``gated-float-boundaries``: the int8 bundle with the int8 boundary pass off (each
  boundary DQ -> Transpose -> Gather -> Q -> Transpose, the earlier runtime);
- ``gated-fp32``: the fp32 bundle with its own thresholds;
- the limit: ungated prefixes cut from the int8 stage graphs (timed in the same rounds).

Then ORT's profile of the int8 full model and of the int8 gated stages (op-type shares, and
whether the int8 ops are the VNNI-capable QLinear/QGemm kernels, with the CPU's flags).
Writes ``results/int8.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _util import CALIBRATION_DATA, DEFAULT_BUNDLE, TEST_DATA, header, require, write_results
from limit_sweep import mix_thresholds

from dgconvert.bench import BenchConfig
from dgconvert.bench.harness import measure, predict_all
from dgconvert.bench.measurements import FULL_DEFAULT, FULL_INT8_DEFAULT
from dgconvert.bench.report import build_results
from dgconvert.bench.systems import OnnxFull, OnnxGated, PrefixProbe, StageProbe, default_sessions
from dgconvert.calibrate.workflow import calibrate_bundle
from dgconvert.convert.quantize import Bounds, QuantizeSettings, quantize_bundle
from dgconvert.core.bundle import Bundle
from dgconvert.data import load_dataset
from dgconvert.runtime import GatedRunner
from dgconvert.runtime.cpu_features import cpu_flags
from dgconvert.runtime.onnxruntime_backend import session_options


def int8_flags() -> list[str]:
    """This CPU's flags that decide MLAS's u8s8 kernels (VNNI, AMX, AVX-512 BW)."""
    flags = cpu_flags() or set()
    return sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f == "avx512bw")


def profile_ops(model: str | bytes, feeds_list: list[dict[str, np.ndarray]],
                optimized: bool = False) -> dict[str, float]:
    """Kernel time per op type in µs (ORT's profiler) over the runs of ``feeds_list``
    (``optimized``: a graph ORT optimized already, loaded at the extended level)."""
    import onnxruntime as ort

    so = session_options()
    so.enable_profiling = True
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        for feeds in feeds_list:
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            times[e["args"].get("op_name", "?")] += e.get("dur", 0)
    return dict(times)


def shares(times: dict[str, float]) -> dict[str, float]:
    """Each op type's share of the time, largest first."""
    total = sum(times.values()) or 1
    return {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def gated_profile(runner: GatedRunner, x: np.ndarray) -> dict[str, float]:
    """Op-type shares of the time over the stages as the runner runs them (its fast-path
    graphs; every row through every stage)."""
    be = runner.backend
    models = [m for m in getattr(be, "_graphs", None) or []]
    if not models:
        return {}
    times: Counter[str] = Counter()
    handle: Any = x  # what the backend hands on (a fast-path handle or an array)
    keep = np.arange(len(x), dtype=np.int64)
    for k, m in enumerate(models):
        io = be.stage_io[k]
        feats = getattr(handle, "value", handle)
        feeds = {io.inputs[0]: feats} if k == 0 else {io.inputs[0]: feats, io.inputs[1]: keep}
        times.update(profile_ops(m.SerializeToString(), [feeds], True))
        handle = be.run_stage(k, handle, keep if k else None).features
    return shares(times)


def _fmt_shares(share: dict[str, float], n: int = 6) -> str:
    return ", ".join(f"{op} {100 * s:.0f} %" for op, s in list(share.items())[:n])


def run_model(src: Bundle, ds: Any, data_name: str, cal_images: np.ndarray, cal_spec: str,
              mix: list[float] | None, config: BenchConfig, calibration_images: int,
              out: Path) -> tuple[list[str], dict]:
    # beside its source: calibrate and bench find the fp32 bundle there by its digest
    int8, qrep = quantize_bundle(src, src.path.parent / f"{src.path.stem}-int8.dg", cal_images,
                                 None,
                                 data=cal_spec, force=True,
                                 settings=QuantizeSettings(calibration_images=calibration_images))
    if mix:
        t8, t32 = mix_thresholds(int8, ds.images, mix), mix_thresholds(src, ds.images, mix)
        how = f"thresholds for {mix} % exits at the gates (each bundle its own)"
    else:
        res = calibrate_bundle(int8, cal_spec, max_drop=0.003, drop_vs="fp32", source=src.path)
        t8, t32 = list(res.thresholds), src.thresholds
        how = ("int8: `calibrate --max-drop 0.3` against the fp32 source's full model "
               f"({cal_spec}); fp32: its own calibrated thresholds")
    main = GatedRunner(int8, backend="onnxruntime", thresholds=t8, max_batch=256)
    floaty = GatedRunner(int8, backend="onnxruntime", thresholds=t8, max_batch=256,
                         fuse_boundaries=False)
    fp32 = GatedRunner(src, backend="onnxruntime", thresholds=t32, max_batch=256)
    systems = [*default_sessions(main), OnnxFull(main), OnnxGated(main),
               OnnxGated(floaty, id="gated-float-boundaries",
                         label="gated int8, int8 boundaries off"),
               OnnxGated(fp32, id="gated-fp32", label="gated fp32 bundle")]
    assert {s.id for s in systems} >= {FULL_DEFAULT, FULL_INT8_DEFAULT}
    probe, prefix = StageProbe(main), PrefixProbe(main)
    meas = measure(systems, ds.images, config, int8.num_stages, probe, prefix)
    preds = {s.id: predict_all(s, ds.images, 256) for s in systems}
    results = build_results(int8, systems, meas, preds, ds.labels)
    x = main.prepare(ds.images[:64])
    prof_full = shares(profile_ops(str(int8.full_file()), [{int8.manifest.input.name: x}] * 3))
    prof_gated = gated_profile(main, x)
    prof_float = gated_profile(floaty, x)
    lines = [f"## {src.path.name} ({len(ds.images)} images of {data_name}; {how})", "",
             f"int8 thresholds {[round(t, 4) for t in t8]}; backend: {main.backend.describe()}",
             *(f"**warning: fast path off: {w}**" for w in main.backend.fast_paths_off()),
             "", *qrep.lines(), "",
             "| batch | system | ms/image | accuracy | exits per stage | gated / full-int8-default "
             "| gated / fp32 default | limit ms | gated / limit |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    rows = []
    for r in results:
        si8 = r.speedup_int8_default.median if r.speedup_int8_default else None
        sfp = r.speedup_default.median if r.speedup_default else None
        eff = r.efficiency_prefix.median if r.efficiency_prefix else None
        n = max(sum(r.exit_histogram), 1)
        hist = "/".join(f"{100 * c / n:.0f}" for c in r.exit_histogram)
        lines.append(
            f"| {r.batch_size} | {r.system} | {r.ms.median:.4f} | "
            f"{'–' if r.accuracy is None else f'{100 * r.accuracy:.2f} %'} | {hist} % | "
            f"{'–' if si8 is None else f'{si8:.2f}×'} | {'–' if sfp is None else f'{sfp:.2f}×'} | "
            f"{'–' if r.ideal_prefix_ms_per_image is None else f'{r.ideal_prefix_ms_per_image:.4f}'}"
            f" | {'–' if eff is None else f'{eff:.2f}'} |")
        rows.append(r.to_dict())
    lines += ["", f"ORT profile, int8 full model, batch 64: {_fmt_shares(prof_full)}",
              f"ORT profile, int8 gated stages (int8 boundaries), batch 64, nobody exiting: "
              f"{_fmt_shares(prof_gated)}",
              f"ORT profile, int8 gated stages (float boundaries), batch 64: "
              f"{_fmt_shares(prof_float)}", ""]
    for r in (main, floaty, fp32):
        r.close()
    return lines, {"bundle": str(src.path), "int8": str(int8.path), "thresholds_int8": t8,
                   "quantization": qrep.to_dict(), "rows": rows,
                   "profile": {"full": prof_full, "gated": prof_gated, "float": prof_float}}


def settings_table(src: Bundle, images: np.ndarray, labels: np.ndarray | None, spec: str,
                   out: Path, grid: list[tuple[int, str]]) -> list[str]:
    """The check against the fp32 source for each (calibration images, keep_fp32) setting,
    always on the last 4,000 images (calibration on the first N): what the defaults were
    chosen by."""
    import time

    check = slice(len(images) - 4000, len(images))

    lines = ["## Quantizer settings (the defaults were chosen by this table)", "",
             "| calibration images | fp32 gate heads | label agreement per stage | "
             "score correlation per gate | full-model agreement | accuracy fp32 → int8 | "
             "quantize s |", "|---:|---|---|---|---:|---|---:|"]
    no_bounds = Bounds(0.0, 0.0, -1.0, 100.0)
    for n, keep in grid:
        t0 = time.perf_counter()
        x = np.concatenate([images[:n], images[check]])
        y = None if labels is None else np.concatenate([labels[:n], labels[check]])
        _, r = quantize_bundle(src, out / f"grid-{n}-{keep}.dg", x, y, data=spec,
                               settings=QuantizeSettings(calibration_images=n, keep_fp32=keep),
                               bounds=no_bounds, force=True)
        dt = time.perf_counter() - t0
        acc = (f"{100 * r.accuracy['fp32']:.2f} → {100 * r.accuracy['int8']:.2f} %"
               if r.accuracy else "–")
        lines.append(f"| {n} | {keep} | {', '.join(f'{100 * a:.2f}' for a in r.stage_agreement)} "
                     f"% | {', '.join(f'{c:.4f}' for c in r.score_correlation)} | "
                     f"{100 * r.full_agreement:.2f} % | {acc} | {dt:.0f} |")
        print(lines[-1], flush=True)
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", default=TEST_DATA)
    ap.add_argument("--calibration-data", default=CALIBRATION_DATA)
    ap.add_argument("--calibration-images", type=int, default=1024)
    ap.add_argument("--extra", action="append", default=[],
                    help="BUNDLE=NPZ=MIX: another fp32 bundle, its images (calibration: the "
                         "first half, timing: the rest) and the exit mix per gate")
    ap.add_argument("--batch-size", default="1,8,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--extra-samples", type=int, default=256)
    ap.add_argument("--settings", action="store_true",
                    help="first compare calibration images 256/1024/4096 and gate heads fp32/int8")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dgconvert-int8")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_size.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    body, data = [], []
    src = Bundle.load(require(args.bundle, "bundle"))
    ds = load_dataset(args.data, num_classes=src.num_classes)
    cal = load_dataset(args.calibration_data, num_classes=src.num_classes)
    if args.settings:
        body += settings_table(src, cal.images, cal.labels, args.calibration_data, args.out,
                               [(256, "gates"), (1024, "gates"), (4096, "gates"), (1024, "none")])
    lines, d = run_model(src, ds, args.data, cal.images, args.calibration_data, None,
                         BenchConfig(sizes, args.repeats, samples=args.samples, progress=False),
                         args.calibration_images, args.out)
    body += lines
    data.append(d)
    print("\n".join(lines), flush=True)
    for spec in args.extra:
        path, npz, mix = spec.split("=")
        b = Bundle.load(require(Path(path), "bundle"))
        allx = load_dataset(npz, num_classes=b.num_classes)
        half = len(allx.images) // 2
        lines, d = run_model(b, allx.subset(slice(half, len(allx.images))),
                             f"{Path(npz).name}[{half}:]", allx.images[:half],
                             Path(npz).name, [float(v) for v in mix.split(",")],
                             BenchConfig(sizes, max(2, args.repeats - 2),
                                         samples=args.extra_samples, progress=False),
                             half, args.out)
        body += lines
        data.append(d)
        print("\n".join(lines), flush=True)
    md = header("INT8 on the CPU: gated int8 against ONNX Runtime's own quantization", [
        f"CPU flags: {', '.join(int8_flags()) or 'no VNNI/AMX flag'} (MLAS picks its u8s8 "
        "kernels by CPUID: with avx512_vnni the QLinearConv/QGemm/MatMulInteger kernels are "
        "the VNNI ones; ORT's profile names the ops, not the ISA)",
        "one interleaved run per model; ratios paired per round (median); every system "
        "gets the same uint8 batches and does its own preprocessing",
    ]) + "\n" + "\n".join(body)
    write_results("int8", md, {"runs": data})


if __name__ == "__main__":
    main()
