"""GaterNet on the reference model: plain backbone vs GaterNet vs GaterNet + d-gates.

1. The reference ResNet (``out/backbone.pt``, else ``dgconvert.train.reference_checkpoint()``)
   gets a GaterNet gater (``dgconvert gates gaternet`` defaults) trained jointly with it on
   ``fashion-mnist:train[:50000]`` (cached in ``out/gaternet.pt`` unless ``--refit``).
2. The GaterNet is exported twice: unpruned, and pruned with the gates off for every image of
   ``fashion-mnist:train[50000:]`` (calibration data neither network was trained on).
3. GaterNet + d-gates: d-gates after layer1..3 of the *pruned* GaterNet, fitted on
   ``train[:10000]``, thresholds calibrated on ``train[50000:]`` with ``--max-drop 0.3``.
4. Everything is measured on ``fashion-mnist:test`` (10,000 images): accuracy through the
   torch-free runtime, per-image FLOPs, ms/image with ONNX Runtime at batch 64 and 1
   (interleaved rounds, median), and the gate kinds per layer on the test set (Figure 2).

Run: ``python benchmarks/gaternet.py`` (about 10 minutes on 2 CPU cores with a cached
backbone). Writes ``benchmarks/results/gaternet.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import CALIBRATION_DATA, RESULTS, TEST_DATA, header, write_results  # noqa: E402

import dgconvert as dg  # noqa: E402
from dgconvert.bench.gate_kinds import plot_gate_kinds  # noqa: E402
from dgconvert.convert.onnx_export import export_onnx  # noqa: E402
from dgconvert.core.gates import format_filter_gates  # noqa: E402
from dgconvert.core.preprocess import normalize  # noqa: E402
from dgconvert.gating.flops import count_flops  # noqa: E402
from dgconvert.gating.gaternet import (  # noqa: E402
    PRUNE_MULTIPLE,
    distribution,
    filter_gate_counts,
    fit_gaternet,
    prune_always_off,
)
from dgconvert.gating.gaternet_exits import fit_gaternet_exits  # noqa: E402

TRAIN = "fashion-mnist:train[:50000]"
DGATE_TRAIN = "fashion-mnist:train[:10000]"


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(fn: Any, x: np.ndarray, batch: int, limit: int) -> float:
    """ms/image of ``fn`` over the first ``limit`` images in batches of ``batch``."""
    x = x[:limit]
    t = time.perf_counter()
    for s in range(0, len(x), batch):
        fn(x[s : s + batch])
    return 1000 * (time.perf_counter() - t) / len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=Path, default=Path("out/backbone.pt"))
    ap.add_argument("--gaternet", type=Path, default=Path("out/gaternet.pt"))
    ap.add_argument("--refit", action="store_true", help="Fit the GaterNet even if cached.")
    ap.add_argument("--fit-options", default="{}",
                    help="JSON keyword arguments for fit_gaternet (default: its defaults, as "
                         "`dgconvert gates gaternet`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ONNX Runtime threads (1: the 2 shared cores spin less)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if not args.backbone.exists():
        from dgconvert import train

        args.backbone = train.reference_checkpoint()
    backbone, _ = dg.load_backbone(args.backbone)
    test = dg.load_dataset(TEST_DATA)
    calib = dg.load_dataset(CALIBRATION_DATA)
    fit_s = None
    if args.gaternet.exists() and not args.refit:
        net = dg.load(args.gaternet)
        fit_report = net.fit_record or {}
        fit_s = fit_report.get("seconds")
    else:
        res = fit_gaternet(args.backbone, TRAIN, threads=args.threads, progress=True,
                           **json.loads(args.fit_options))
        net, fit_report, fit_s = res.net, res.as_dict(), res.seconds
        dg.save(net, args.gaternet)
        print(res.table(), file=sys.stderr)
    norm = net.normalization
    xt = normalize(test.images, norm)
    x1 = torch.from_numpy(xt[:1])
    with torch.no_grad():
        plain_acc = float((backbone.eval()(torch.from_numpy(xt)).argmax(1).numpy() == test.labels).mean())
        gn_logits = net(torch.from_numpy(xt)).numpy()
    gn_acc_torch = float((gn_logits.argmax(1) == test.labels).mean())
    plain_flops = count_flops(backbone, x1)
    # gate kinds: on the calibration data (what pruning uses) and on the test set (paper)
    counts_cal = filter_gate_counts(net, calib.images)
    off = counts_cal == 0
    pruned = prune_always_off(net, off, PRUNE_MULTIPLE)  # what export does by default
    with torch.no_grad():
        logit_diff = float(np.abs(pruned.net(torch.from_numpy(xt)).numpy() - gn_logits).max())
    counts_test = filter_gate_counts(net, test.images)
    kinds_test = distribution(net, counts_test, len(test))
    flip = int(((counts_test > 0) & off).sum())  # pruned gates some test image switches on
    tmp = Path(tempfile.mkdtemp(prefix="gaternet-bench-"))
    verify = torch.from_numpy(xt[:256])
    b_unpruned = dg.export(net, tmp / "gaternet_unpruned.dg", verify_input=verify)
    b_pruned = dg.export(net, tmp / "gaternet.dg", verify_input=verify,
                         prune_images=calib.images, prune_source=CALIBRATION_DATA)
    b_exact = dg.export(net, tmp / "gaternet_exact.dg", verify_input=verify,
                        prune_images=calib.images, prune_source=CALIBRATION_DATA,
                        prune_multiple=1)
    gn, gn_exact = b_pruned.manifest.gaternet, b_exact.manifest.gaternet
    assert gn is not None and gn_exact is not None
    export_onnx(backbone, (verify[:8],), tmp / "plain.onnx", ("images",), ("logits",))
    # GaterNet + d-gates on the pruned GaterNet
    dres = fit_gaternet_exits(pruned.net, DGATE_TRAIN, ["layer1", "layer2", "layer3"])
    b_dg = dg.export(dres.net, tmp / "gaternet_dgates.dg", verify_input=verify)
    subprocess.run([sys.executable, "-m", "dgconvert", "calibrate", str(b_dg.path),
                    "--data", CALIBRATION_DATA, "--max-drop", "0.3"], check=True,
                   capture_output=True)  # fmt: skip
    b_dg = dg.Bundle.load(b_dg.path)
    bundles = {"gaternet_pruned": b_pruned, "gaternet_unpruned": b_unpruned,
               "gaternet_exact": b_exact, "gaternet_dgates": b_dg}
    runners = {k: dg.runtime.GatedRunner(b.path, backend="onnxruntime", max_batch=64,
                                         threads=args.threads)  # as many threads as plain
               for k, b in bundles.items()}
    results: dict[str, dict[str, Any]] = {}
    preds = {k: r.predict(test.images) for k, r in runners.items()}
    costs = b_dg.exit_costs()
    dg_flops = float(np.mean([costs[s] for s in preds["gaternet_dgates"].exit_stage]))
    for key, p in preds.items():
        results[key] = {"accuracy": float((p.labels == test.labels).mean())}
    results["gaternet_pruned"]["flops"] = gn.flops_pruned
    results["gaternet_exact"]["flops"] = gn_exact.flops_pruned
    results["gaternet_unpruned"]["flops"] = gn.flops_masked
    results["gaternet_dgates"]["flops"] = dg_flops
    results["gaternet_dgates"]["exit_rates"] = np.bincount(
        preds["gaternet_dgates"].exit_stage, minlength=b_dg.num_stages).tolist()
    results["gaternet_dgates"]["thresholds"] = [float(t) for t in b_dg.thresholds]
    results["plain"] = {"accuracy": plain_acc, "flops": plain_flops}
    agree = float((preds["gaternet_pruned"].labels == gn_logits.argmax(1)).mean())
    # timing: interleaved rounds, median ms/image
    sess = {"plain": _session(tmp / "plain.onnx", args.threads)}
    fns = {"plain": lambda x: sess["plain"].run(None, {"images": x}),
           **{k: (lambda x, r=r: r.predict(x)) for k, r in runners.items()}}
    raw = test.images
    for batch, limit in ((64, 2048), (1, 300)):
        for r in runners.values():
            r.max_batch = batch
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                samples[k].append(_time(fn, xt if k == "plain" else raw, batch, limit))
        for k, v in samples.items():
            results[k][f"ms_per_image_b{batch}"] = statistics.median(v)
    plot_gate_kinds(kinds_test, args.out / "gaternet.png",
                    title="GaterNet gate kinds per layer (Fashion-MNIST test set)")
    data = {"results": results, "fit": fit_report, "fit_seconds": fit_s,
            "pruning": gn.to_dict(), "pruning_exact": gn_exact.to_dict(), "kinds_test": [k.to_dict() for k in kinds_test],
            "pruned_gates_on_for_some_test_image": flip,
            "pruned_vs_unpruned_label_agreement_test": agree,
            "pruned_vs_unpruned_max_abs_logit_diff_test": logit_diff,
            "gaternet_torch_test_accuracy": gn_acc_torch,
            "seconds": round(time.perf_counter() - t_start, 1)}
    write_results("gaternet", render(data, args), data, args.out)
    return 0


def _fit_options(d: dict[str, Any]) -> str:
    o = d["fit"].get("options", {})
    keys = ("sparsity", "target_rate", "rate_weights", "off_below", "epochs", "settle_epochs")
    return ", ".join(f"{k} {o[k]}" for k in keys if o.get(k) is not None)


def render(d: dict[str, Any], args: argparse.Namespace) -> str:
    r = d["results"]
    p = d["pruning"]
    base = r["plain"]["flops"]
    rows = [("plain backbone", "plain"), ("GaterNet, unpruned", "gaternet_unpruned"),
            ("GaterNet, every always-off filter pruned (`--prune-multiple 1`)", "gaternet_exact"),
            (f"GaterNet, pruned in multiples of {PRUNE_MULTIPLE} channels (default)",
             "gaternet_pruned"),
            ("GaterNet (pruned) + d-gates, --max-drop 0.3", "gaternet_dgates")]
    lines = [header("GaterNet vs the plain backbone (Fashion-MNIST test set, 10,000 images)",
                    [f"GaterNet fit: `dgconvert gates gaternet` ({_fit_options(d)}) on "
                     f"{TRAIN}, 1 torch thread",
                     f"pruning and d-gate calibration data: {CALIBRATION_DATA}; d-gates fitted "
                     f"on {DGATE_TRAIN}", f"timing: ONNX Runtime CPU, {args.threads} threads, "
                     f"median of {args.rounds} interleaved rounds"]),
             "| model | test accuracy | MFLOPs/image | vs plain | ms/image b64 | ms/image b1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for title, key in rows:
        v = r[key]
        lines.append(f"| {title} | {100 * v['accuracy']:.2f} % | {v['flops'] / 1e6:.2f} | "
                     f"{100 * (v['flops'] / base - 1):+.1f} % | {v['ms_per_image_b64']:.3f} | "
                     f"{v['ms_per_image_b1']:.3f} |")
    from dgconvert.core.gates import FilterGateLayer

    cal_layers = [FilterGateLayer(**{k: v for k, v in lay.items()}) for lay in p["layers"]]
    test_layers = [FilterGateLayer(**lay) for lay in d["kinds_test"]]
    pe = d["pruning_exact"]
    lines += [
        "",
        f"Pruning: {100 * pe['pruned_share']:.1f} % of the {sum(x.filters for x in cal_layers)} "
        f"gated filters were off for all {p['samples']} calibration images; removing all of "
        f"them takes the FLOPs from {pe['flops_masked'] / 1e6:.2f} to "
        f"{pe['flops_pruned'] / 1e6:.2f} M per image "
        f"({100 * (1 - pe['flops_pruned'] / pe['flops_masked']):.1f} % fewer), but leaves "
        "layers with channel counts ONNX Runtime cannot run in its blocked layout (slower "
        f"kernels and reorders). By default pruned layers keep multiples of {PRUNE_MULTIPLE} "
        f"channels: {100 * p['pruned_share']:.1f} % removed, "
        f"{p['flops_pruned'] / 1e6:.2f} M per image "
        f"({100 * (1 - p['flops_pruned'] / p['flops_masked']):.1f} % fewer). The pruned "
        f"bundle's labels agree with the unpruned GaterNet on "
        f"{100 * d['pruned_vs_unpruned_label_agreement_test']:.2f} % of the test images "
        f"({d['pruned_gates_on_for_some_test_image']} pruned gates are switched on by some "
        "test image; pruned, they stay off); largest logit difference, pruned vs unpruned "
        f"in torch on the test set: {d['pruned_vs_unpruned_max_abs_logit_diff_test']:.1e}.",
        f"GaterNet test accuracy in torch: {100 * d['gaternet_torch_test_accuracy']:.2f} %.",
        f"d-gates: exits per stage {r['gaternet_dgates']['exit_rates']}, thresholds "
        f"{[round(t, 3) for t in r['gaternet_dgates']['thresholds']]}.",
        "",
        "Gate kinds on the calibration images (what pruning used):",
        "",
        "```",
        format_filter_gates(cal_layers),
        "```",
        "",
        "Gate kinds on the test set (the paper's Figure 2; plot: `gaternet.png`):",
        "",
        "```",
        format_filter_gates(test_layers),
        "```",
        "",
        f"Total run time {d['seconds']:.0f} s"
        + (f" (GaterNet fit {d['fit_seconds']:.0f} s)." if d.get("fit_seconds") else "."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
