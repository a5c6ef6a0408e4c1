"""Does calibration hold on unseen data? Resampled calibration/unseen splits of real records.

    .venv/bin/python benchmarks/calibration_sim.py [--splits 40] [--sizes 1000,3000,7000]

The reference model's gate records on 20,000 labelled images it never trained on
(``benchmarks/data/reference_records.npz``, written by ``collect_records.py``) are split at
random, many times, into a calibration set of each size and the unseen rest. Each mode
calibrates on the calibration set alone; its thresholds are then run on the unseen rest.

Modes: ``default`` (:func:`dgconvert.calibrate.calibrate` without a confidence: frontier
searched on one part, walked on another, estimate on the held-out 30 %), ``confidence``
(``--confidence``, default 0.9: fixed-sequence paired test on the held-out part), and
``search-only`` (what calibrate did before: the cheapest vector meeting the target on the
very samples it searched, 70 % of the calibration set).

Reported per size, target and mode: mean and 90th percentile of the unseen drop (points
below the full model on the same unseen images), the share of splits whose unseen drop is
within the target (for ``confidence``: the coverage of the guarantee; also against the
drop on all 20,000 images, the population the splits are drawn from), mean and 10th
percentile of the FLOPs cut on the unseen images, fallbacks to the full model and errors.
For ``default``: how often the reported 90 % interval of the drop held the unseen drop.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.calibrate import (
    CalibrationError,
    Estimate,
    GateRecords,
    calibrate,
    simulate,
    split_indices,
)
from dgconvert.calibrate.pipeline import CONFIDENCE_HOLDOUT, SELECT_MARGIN
from dgconvert.calibrate.search import search
from dgconvert.calibrate.selection import estimate, walk_frontier

ROOT = Path(__file__).resolve().parent
RECORDS = ROOT / "data" / "reference_records.npz"
RESULTS = ROOT / "results"
MODES = ("default", "confidence", "search-only")

_DATA: dict[str, Any] = {}


def load(path: Path) -> tuple[GateRecords, np.ndarray, np.ndarray]:
    """Records, ground truth and exit costs from an ``.npz`` written by collect_records.py."""
    with np.load(path) as z:
        rec = GateRecords(z["scores"], z["labels"].astype(np.int64),
                          z["final_labels"].astype(np.int64))
        return rec, z["y"].astype(np.int64), z["exit_costs"].astype(np.float64)


def _init(path: str) -> None:
    _DATA["rec"], _DATA["y"], _DATA["costs"] = load(Path(path))


def _drop(rec: GateRecords, y: np.ndarray, t: tuple[float, ...], costs: np.ndarray
          ) -> tuple[float, float]:
    out = simulate(rec, y, t, costs)
    return float(np.mean(rec.final_labels == y) - out.accuracy), 1.0 - out.cost_fraction


def _row(base: dict[str, Any], ru: GateRecords, yu: np.ndarray, rec: GateRecords,
         y: np.ndarray, costs: np.ndarray, t: tuple[float, ...], fallback: bool,
         est: Estimate | None, seconds: float) -> dict[str, Any]:
    d_u, cut_u = _drop(ru, yu, t, costs)
    d_p, _ = _drop(rec, y, t, costs)
    row = {**base, "unseen_drop": 100 * d_u, "pool_drop": 100 * d_p, "flops_cut": 100 * cut_u,
           "fallback": fallback, "seconds": seconds}
    if est is not None:
        lo, hi = est.drop_interval
        row.update(est_drop=100 * est.drop, est_lo=100 * lo, est_hi=100 * hi,
                   est_cut=100 * (1 - est.cost_fraction))
    return row


def _other_margins(r: Any, rc: GateRecords, yc: np.ndarray, costs: np.ndarray, split: int,
                   drop_pt: float, margins: tuple[float, ...]
                   ) -> list[tuple[float, tuple[float, ...], bool, Estimate | None]]:
    """The default mode's choice with other selection margins: the same split, search and
    frontier as ``r`` (calibrate's own split rule), only the walk differs."""
    cal_idx, held_idx = split_indices(rc.n, 0.3, split)
    sel_pos, _ = split_indices(cal_idx.size, 0.5, split + 1)
    sel = cal_idx[sel_pos]
    family = list(r.family)
    out = []
    for m in margins:
        w = walk_frontier(rc.subset(sel), yc[sel], family, costs, target=r.target_accuracy,
                          max_drop=drop_pt / 100, margin=m)
        out.append((m, w.thresholds, w.fallback,
                    estimate(rc.subset(held_idx), yc[held_idx], w.thresholds, costs)))
    return out


def run_split(job: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Every mode on one random split: ``(calibration size, max drop in points, split
    index, confidence, select margin, confidence-mode holdout, modes, extra margins)``."""
    size, drop_pt, split, conf, margin, conf_holdout, modes, extra = job
    rec, y, costs = _DATA["rec"], _DATA["y"], _DATA["costs"]
    perm = np.random.default_rng([size, int(drop_pt * 1000), split]).permutation(rec.n)
    cal, unseen = np.sort(perm[:size]), np.sort(perm[size:])
    rc, yc, ru, yu = rec.subset(cal), y[cal], rec.subset(unseen), y[unseen]
    rows = []
    for mode in modes:
        base: dict[str, Any] = {"size": size, "max_drop": drop_pt, "split": split, "mode": mode}
        start = time.perf_counter()
        try:
            if mode == "search-only":
                part = np.sort(np.random.default_rng(split).permutation(size)[: int(0.7 * size)])
                full = float(np.mean(rc.final_labels[part] == yc[part]))
                res = search(rc.subset(part), yc[part], costs, target_accuracy=full - drop_pt / 100)
                t, fallback, est, r = res.best.thresholds, False, None, None
            else:
                c = conf if mode == "confidence" else None
                r = calibrate(rc, yc, costs, max_drop=drop_pt / 100, confidence=c, seed=split,
                              holdout=0.3 if c is None else conf_holdout,
                              select_margin=margin)
                t, fallback, est = r.thresholds, r.fallback, r.expected
        except CalibrationError as exc:
            rows.append({**base, "error": str(exc)[:200]})
            continue
        seconds = time.perf_counter() - start
        rows.append(_row(base, ru, yu, rec, y, costs, t, fallback, est, seconds))
        if mode == "default" and extra:
            for m, t2, fb2, est2 in _other_margins(r, rc, yc, costs, split, drop_pt, extra):
                base2 = {**base, "mode": f"default, margin {m:g} SE"}
                rows.append(_row(base2, ru, yu, rec, y, costs, t2, fb2, est2, 0.0))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (size, max drop, mode)."""
    out = []
    keys = sorted({(r["size"], r["max_drop"], r["mode"]) for r in rows},
                  key=lambda k: (k[0], k[1], MODES.index(k[2]) if k[2] in MODES else 0.5, k[2]))
    for size, drop, mode in keys:
        rs = [r for r in rows if (r["size"], r["max_drop"], r["mode"]) == (size, drop, mode)]
        ok = [r for r in rs if "error" not in r]
        d = np.array([r["unseen_drop"] for r in ok])
        p = np.array([r["pool_drop"] for r in ok])
        cut = np.array([r["flops_cut"] for r in ok])
        line: dict[str, Any] = {
            "size": size, "max_drop": drop, "mode": mode, "splits": len(rs),
            "errors": len(rs) - len(ok), "fallbacks": sum(bool(r["fallback"]) for r in ok),
        }
        if ok:
            line.update(
                mean_drop=float(d.mean()), p90_drop=float(np.quantile(d, 0.9)),
                within=float(np.mean(d <= drop + 1e-9)),
                within_pool=float(np.mean(p <= drop + 1e-9)),
                mean_cut=float(cut.mean()), p10_cut=float(np.quantile(cut, 0.1)),
            )
        est = [r for r in ok if "est_drop" in r]
        if est:
            line.update(
                interval_holds=float(np.mean([r["est_lo"] <= r["unseen_drop"] <= r["est_hi"]
                                              for r in est])),
                mean_est_drop=float(np.mean([r["est_drop"] for r in est])),
            )
        out.append(line)
    return out


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Calibration on unseen data: resampled splits of the reference model's records",
        "",
        f"- records: `{meta['records']}` — {meta['n']} labelled images "
        f"({', '.join(meta['sources'])}), {meta['gates']} gates, full-model accuracy "
        f"{100 * meta['full_accuracy']:.2f} %",
        f"- {meta['splits']} random calibration/unseen splits per row; the unseen part is "
        "every image not in the calibration set",
        f"- confidence mode: `--confidence {meta['confidence']}`, held-out share "
        f"{meta['confidence_holdout']}; default mode: held-out share 0.3, selection margin "
        f"{meta['select_margin']} standard errors",
        f"- command: `{meta['command']}`; {meta['seconds']:.0f} s",
        "",
        "Drops are in accuracy points below the full model on the same unseen images; "
        "*within* is the share of splits whose unseen drop is at most the target (the "
        "coverage of the guarantee in confidence mode), *pop.* the same against the drop on "
        "all images (the population the splits are drawn from); FLOPs cut on the unseen "
        "images. *interval* (default mode): share of splits whose reported 90 % drop "
        "interval held the unseen drop.",
        "",
        "| cal. size | max drop | mode | mean drop | p90 drop | within | pop. | mean FLOPs "
        "cut | p10 FLOPs cut | fallbacks | errors | interval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if "mean_drop" not in s:
            lines.append(f"| {s['size']} | {s['max_drop']} | {s['mode']} | – | – | – | – | – "
                         f"| – | {s['fallbacks']} | {s['errors']}/{s['splits']} | – |")
            continue
        iv = f"{100 * s['interval_holds']:.0f} %" if "interval_holds" in s else "–"
        lines.append(
            f"| {s['size']} | {s['max_drop']} | {s['mode']} | {s['mean_drop']:.3f} | "
            f"{s['p90_drop']:.3f} | {100 * s['within']:.0f} % | {100 * s['within_pool']:.0f} % | "
            f"{s['mean_cut']:.1f} % | {s['p10_cut']:.1f} % | {s['fallbacks']} | "
            f"{s['errors']}/{s['splits']} | {iv} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = sorted({r["size"] for r in rows})
    drops = sorted({r["max_drop"] for r in rows})
    fig = Figure(figsize=(4.2 * len(sizes), 3.6 * len(drops)))
    FigureCanvasAgg(fig)
    colors = {"default": "tab:blue", "confidence": "tab:green", "search-only": "tab:red"}
    plotted = [m for m in MODES if m in {r["mode"] for r in rows}]
    for i, drop in enumerate(drops):
        for j, size in enumerate(sizes):
            ax = fig.add_subplot(len(drops), len(sizes), i * len(sizes) + j + 1)
            for mode in plotted:
                rs = [r for r in rows if (r["size"], r["max_drop"], r["mode"]) == (size, drop, mode)
                      and "error" not in r]
                if not rs:
                    continue
                ax.plot([r["flops_cut"] for r in rs], [r["unseen_drop"] for r in rs], ".",
                        color=colors[mode], alpha=0.6, label=mode)
            ax.axhline(drop, color="k", linestyle="--", linewidth=0.8)
            ax.set_title(f"{size} calibration samples, max drop {drop} pt", fontsize="small")
            ax.set_xlabel("FLOPs cut on unseen (%)")
            ax.set_ylabel("unseen drop (pt)")
            ax.grid(True, alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=Path, default=RECORDS)
    ap.add_argument("--sizes", default="1000,3000,7000")
    ap.add_argument("--drops", default="0.3,1.0", help="max drops in points")
    ap.add_argument("--splits", type=int, default=40)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--margin", type=float, default=None,
                    help="default mode's selection margin in standard errors (calibrate's default)")
    ap.add_argument("--conf-holdout", type=float, default=None,
                    help="held-out share in confidence mode (calibrate's default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--extra-margins", default="",
                    help="also the default mode's choice with these selection margins (SE)")
    ap.add_argument("--stem", default="calibration_sim")
    args = ap.parse_args()
    start = time.perf_counter()
    rec, y, costs = load(args.records)
    with np.load(args.records) as z:
        sources = [str(s) for s in z["sources"]] if "sources" in z else []
    margin = SELECT_MARGIN if args.margin is None else args.margin
    conf_holdout = CONFIDENCE_HOLDOUT if args.conf_holdout is None else args.conf_holdout
    modes = tuple(args.modes.split(","))
    extra = tuple(float(m) for m in args.extra_margins.split(",") if m)
    jobs = [(int(s), float(d), i, args.confidence, margin, conf_holdout, modes, extra)
            for s in args.sizes.split(",") for d in args.drops.split(",")
            for i in range(args.splits)]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.workers, initializer=_init,
                             initargs=(str(args.records),)) as pool:
        for n_done, part in enumerate(pool.map(run_split, jobs), 1):
            rows.extend(part)
            if n_done % 10 == 0:
                print(f"{n_done}/{len(jobs)} splits", flush=True)
    summary = summarize(rows)
    meta = {
        "records": str(args.records.relative_to(ROOT.parent)) if args.records.is_relative_to(
            ROOT.parent) else str(args.records),
        "n": rec.n, "gates": rec.num_gates, "sources": sources,
        "full_accuracy": float(np.mean(rec.final_labels == y)), "splits": args.splits,
        "confidence": args.confidence, "exit_costs": costs.tolist(),
        "select_margin": margin, "confidence_holdout": conf_holdout,
        "command": " ".join(["benchmarks/calibration_sim.py", *sys.argv[1:]]),
        "seconds": time.perf_counter() - start,
    }
    RESULTS.mkdir(exist_ok=True)
    md = markdown(summary, meta)
    (RESULTS / f"{args.stem}.md").write_text(md)
    (RESULTS / f"{args.stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    plot(rows, RESULTS / f"{args.stem}.png")
    print(md)


if __name__ == "__main__":
    main()
