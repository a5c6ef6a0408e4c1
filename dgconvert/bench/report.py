"""Benchmark results: per-(system, batch size) rows, JSON, Markdown tables and a plot.

JSON (``BenchReport.to_dict()``, ``format: dgconvert-bench``, ``schema_version: 1``) keeps
its keys stable: ``results[]`` rows always carry ``system``, ``batch_size``,
``ms_per_image``, ``images_per_s``, ``accuracy`` and ``efficiency`` (``null`` where not
applicable: full models have no efficiency, unlabelled data no accuracy), plus spreads,
speed-up, exit histograms, FLOPs, cost shares, ideals and peak memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.bench.measurements import FULL_DEFAULT, FULL_INT8_DEFAULT, Measurements
from dgconvert.bench.stats import (
    Spread,
    cost_share_flops,
    cost_share_time,
    histogram_from_rows,
    paired_ratios,
    rows_from_histogram,
    summarize,
)
from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GatedResult
from dgconvert.core.manifest import encode_thresholds, now_iso

if TYPE_CHECKING:  # pragma: no cover
    from dgconvert.bench.systems import System

FORMAT = "dgconvert-bench"
SCHEMA_VERSION = 1


def _finite(values: Sequence[float] | None) -> list[float | None] | None:
    """JSON has no infinity: a disabled gate's ``inf`` threshold is written as ``null``."""
    return None if values is None else encode_thresholds(values)


@dataclass
class SystemResult:
    """One system at one batch size."""

    system: str
    label: str
    kind: str
    framework: str
    batch_size: int
    images: int  # images per timed pass
    ms: Spread  # ms per image over the repeats
    images_per_s: float
    accuracy: float | None
    exit_histogram: list[int]  # over the whole data set
    rows_per_stage: list[int]  # rows each stage processed in one timed pass
    gflops_per_image: float
    reference: str | None = None
    thresholds: list[float] | None = None
    speedup: Spread | None = None  # reference time / this time, paired per repeat
    cost_share_flops: float | None = None
    cost_share_time: float | None = None
    ideal_ms_per_image: float | None = None  # reference ms x time share
    ideal_flops_ms_per_image: float | None = None  # reference ms x FLOPs share
    efficiency: Spread | None = None  # ideal (time share) / measured
    efficiency_flops: Spread | None = None  # ideal (FLOPs share) / measured
    ideal_prefix_ms_per_image: float | None = None  # each exit pays its ungated prefix only
    efficiency_prefix: Spread | None = None  # ideal (prefixes) / measured: the physical limit
    speedup_default: Spread | None = None  # a default ONNX Runtime session on full.onnx / this
    speedup_int8_default: Spread | None = None  # int8 bundles: full-int8-default / this
    peak_rss_mb: float | None = None
    peak_rss_delta_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        def med(s: Spread | None) -> float | None:
            return None if s is None else s.median

        return {
            "system": self.system,
            "batch_size": self.batch_size,
            "ms_per_image": self.ms.median,
            "images_per_s": self.images_per_s,
            "accuracy": self.accuracy,
            "efficiency": med(self.efficiency),
            "label": self.label,
            "kind": self.kind,
            "framework": self.framework,
            "reference": self.reference,
            "thresholds": _finite(self.thresholds),
            "images": self.images,
            "repeats": self.ms.n,
            "ms_per_image_min": self.ms.min,
            "ms_per_image_max": self.ms.max,
            "ms_per_image_q1": self.ms.q1,
            "ms_per_image_q3": self.ms.q3,
            "speedup": med(self.speedup),
            "speedup_min": None if self.speedup is None else self.speedup.min,
            "speedup_max": None if self.speedup is None else self.speedup.max,
            "efficiency_min": None if self.efficiency is None else self.efficiency.min,
            "efficiency_max": None if self.efficiency is None else self.efficiency.max,
            "efficiency_flops": med(self.efficiency_flops),
            "ideal_ms_per_image": self.ideal_ms_per_image,
            "ideal_flops_ms_per_image": self.ideal_flops_ms_per_image,
            "ideal_prefix_ms_per_image": self.ideal_prefix_ms_per_image,
            "efficiency_prefix": med(self.efficiency_prefix),
            "speedup_vs_default_session": med(self.speedup_default),
            **({"speedup_vs_int8_default_session": med(self.speedup_int8_default)}
               if self.speedup_int8_default is not None else {}),
            "cost_share_time": self.cost_share_time,
            "cost_share_flops": self.cost_share_flops,
            "gflops_per_image": self.gflops_per_image,
            "exit_histogram": list(self.exit_histogram),
            "rows_per_stage": list(self.rows_per_stage),
            "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_delta_mb": self.peak_rss_delta_mb,
        }


def stage_ms(meas: Measurements, batch_size: int, probe: str = "stages") -> list[float]:
    """Median ms per image of each stage graph (``probe="stages"``) or each ungated prefix
    (``"prefixes"``) run alone on full batches; empty when that probe did not run."""
    seconds = meas.prefix_seconds if probe == "prefixes" else meas.stage_seconds
    if batch_size not in seconds:
        return []
    n = meas.images[probe][batch_size]
    return [1e3 * float(np.median(col)) / n for col in zip(*seconds[batch_size], strict=True)]


def prefix_ideal_seconds(meas: Measurements, batch_size: int, rows_reached: Sequence[int],
                         ) -> list[float] | None:
    """Per repeat: the time the same images would take if each paid only the ungated prefix
    up to its exit (exits from ``rows_reached``), from the prefixes timed in that repeat."""
    rounds = meas.prefix_seconds.get(batch_size)
    if not rounds:
        return None
    hist = histogram_from_rows(rows_reached)
    n_probe = meas.images["prefixes"][batch_size]
    return [sum(h * t / n_probe for h, t in zip(hist, pre, strict=True)) for pre in rounds]


def build_results(
    bundle: Bundle,
    systems: Sequence[System],
    meas: Measurements,
    preds: Mapping[str, GatedResult],
    labels: np.ndarray | None,
) -> list[SystemResult]:
    """Turn raw measurements into result rows (speed-ups, shares, ideals, efficiencies)."""
    costs = bundle.exit_costs()
    full_flops = float(bundle.full_flops) or costs[-1]
    s_count = bundle.num_stages
    out: list[SystemResult] = []
    for b in sorted({b for s in systems for b in meas.seconds.get(s.id, {})}):
        st_ms = stage_ms(meas, b) if b in meas.stage_seconds else []
        for s in systems:
            n = meas.images[s.id][b]
            secs = meas.seconds[s.id][b]
            pred = preds[s.id]
            hist_all = np.bincount(pred.exit_stage, minlength=s_count).tolist()
            acc = None if labels is None or len(labels) == 0 else float((pred.labels == labels).mean())
            hist_timed = np.bincount(pred.exit_stage[:n], minlength=s_count).tolist()
            ms = summarize(secs).scaled(1e3 / n)
            peak = meas.peak.get(s.id, {}).get(b)
            r = SystemResult(
                system=s.id, label=s.label, kind=s.kind, framework=s.framework, batch_size=b,
                images=n, ms=ms, images_per_s=n / float(np.median(secs)), accuracy=acc,
                exit_histogram=hist_all, rows_per_stage=list(meas.rows[s.id][b]),
                gflops_per_image=full_flops / 1e9, reference=s.reference,
                thresholds=s.thresholds,
                peak_rss_mb=None if peak is None else peak[0] / 2**20,
                peak_rss_delta_mb=None if peak is None else peak[1] / 2**20,
            )
            if s.kind == "gated":
                share_f = cost_share_flops(hist_timed, costs, full_flops)
                r.cost_share_flops = share_f
                # the naive masked model pays every stage and gate whatever the exits
                paid = hist_timed if s.framework == "onnx" else [0] * (s_count - 1) + [n]
                r.gflops_per_image = cost_share_flops(paid, costs, full_flops) * full_flops / 1e9
                rows = (r.rows_per_stage if s.framework == "onnx"
                        else rows_from_histogram(hist_timed))
                if st_ms:
                    r.cost_share_time = cost_share_time(rows, st_ms)
            if s.kind == "gated" and s.framework == "onnx":
                ideal = prefix_ideal_seconds(meas, b, r.rows_per_stage)
                if ideal is not None:
                    r.ideal_prefix_ms_per_image = 1e3 * float(np.median(ideal)) / n
                    r.efficiency_prefix = paired_ratios(ideal, secs)
                for sid, attr in ((FULL_DEFAULT, "speedup_default"),
                                  (FULL_INT8_DEFAULT, "speedup_int8_default")):
                    default = meas.seconds.get(sid, {}).get(b)
                    if default is not None and meas.images[sid][b] == n:
                        setattr(r, attr, paired_ratios(default, secs))
            if s.reference is not None and s.reference in meas.seconds:
                ref = meas.seconds[s.reference][b]
                if meas.images[s.reference][b] != n:
                    raise BenchError(f"{s.id} and its reference {s.reference} timed different "
                                     f"images at batch {b}; expected the same")
                r.speedup = paired_ratios(ref, secs)
                ref_ms = 1e3 * float(np.median(ref)) / n
                if r.cost_share_time is not None:
                    r.ideal_ms_per_image = ref_ms * r.cost_share_time
                    r.efficiency = paired_ratios(np.asarray(ref) * r.cost_share_time, secs)
                if r.cost_share_flops is not None:
                    r.ideal_flops_ms_per_image = ref_ms * r.cost_share_flops
                    r.efficiency_flops = paired_ratios(np.asarray(ref) * r.cost_share_flops, secs)
            out.append(r)
    return out


@dataclass
class BenchReport:
    """Everything one ``dgconvert bench`` run measured."""

    bundle: str
    data: str
    num_images: int
    thresholds: list[float]
    backend: dict[str, Any]
    config: dict[str, Any]
    machine: dict[str, Any]
    flops: dict[str, Any]
    stages: list[dict[str, Any]]
    results: list[SystemResult]
    memory_method: str = ""
    skipped_batch_sizes: list[int] = field(default_factory=list)
    created: str = field(default_factory=now_iso)

    # -- access --------------------------------------------------------------------------
    @property
    def batch_sizes(self) -> list[int]:
        return sorted({r.batch_size for r in self.results})

    def result(self, system: str, batch_size: int) -> SystemResult:
        for r in self.results:
            if r.system == system and r.batch_size == batch_size:
                return r
        raise KeyError(f"no result for system {system!r} at batch size {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with stable keys (see the module docstring)."""
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        d["thresholds"] = _finite(self.thresholds)
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, **d}

    # -- rendering -----------------------------------------------------------------------
    def markdown(self) -> str:
        """Header lines plus one table per batch size."""
        from dgconvert.bench.machine import describe_machine

        t = ", ".join("inf" if not math.isfinite(v) else f"{v:g}" for v in self.thresholds)
        lines = [
            f"**{self.bundle}** on {self.data or 'the given images'} ({self.num_images} images "
            f"for accuracy); thresholds ({t})",
            f"backend: {self.backend.get('describe')}",
            *([f"runtime paths: {self.backend['paths']}"] if self.backend.get("paths") else []),
            *(f"**warning: fast path off: {w}**" for w in self.backend.get("fast_paths_off", [])),
            f"machine: {describe_machine(self.machine)}",
            f"load average at start: {self.machine.get('load_average_start')}",
            "",
            "ms/image: median over repeats [min–max]; speed-up and efficiency: median of "
            "per-repeat ratios to the same framework's full model; efficiency = ideal / "
            "measured with ideal = full ms × cost share (time share from stage graphs timed "
            "alone / FLOPs share); the physical limit: each image pays only the ungated prefix "
            "of the full model up to its exit (prefixes timed in the same rounds).",
        ]
        for b in self.batch_sizes:
            rows = [r for r in self.results if r.batch_size == b]
            stage = next((s for s in self.stages if s["batch_size"] == b), None)
            lines += ["", f"### batch size {b} ({rows[0].images} images per pass, "
                      f"{rows[0].ms.n} repeats)", ""]
            lines.append(render_table(rows))
            if stage:
                st = ", ".join(f"{v:.4f}" for v in stage["stage_ms_per_image"])
                lines.append("")
                lines.append(f"stage graphs alone, ms/image: {st} (sum "
                             f"{sum(stage['stage_ms_per_image']):.4f})")
                if stage.get("prefix_ms_per_image"):
                    pre = ", ".join(f"{v:.4f}" for v in stage["prefix_ms_per_image"])
                    lines.append(f"ungated prefixes up to each exit, ms/image: {pre}")
        if self.skipped_batch_sizes:
            lines += ["", f"skipped batch sizes (more than the timed images): "
                      f"{self.skipped_batch_sizes}"]
        return "\n".join(lines)

    def paper_table(self, batch_size: int) -> str:
        """The d-gate paper's Table 1 layout at one batch size (ONNX systems)."""
        return render_paper_table([r for r in self.results
                                   if r.batch_size == batch_size and r.framework == "onnx"])

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of ms/image against batch size, one line per system (min–max bars)."""
        return plot_results(self.results, path, title=title or
                            f"{Path(self.bundle).name}: {self.backend.get('describe')}")


def _fmt_acc(a: float | None) -> str:
    return "–" if a is None else f"{100 * a:.2f} %"


def _fmt_hist(h: Sequence[int]) -> str:
    n = max(sum(h), 1)
    return "/".join(f"{100 * c / n:.0f}" for c in h) + " %"


def render_table(rows: Sequence[SystemResult]) -> str:
    """Markdown table of result rows (one batch size)."""
    head = ("| system | ms/image [min–max] | images/s | speed-up (vs default ORT) | accuracy "
            "| exits per stage | GFLOPs/image | ideal ms (time / FLOPs) | efficiency (time / FLOPs) "
            "| limit ms | efficiency vs limit | peak RSS MB (Δ) |")
    out = [head, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = "–" if r.speedup is None else f"{r.speedup.median:.2f}×"
        if r.speedup_default is not None:
            sp += f" ({r.speedup_default.median:.2f}×)"
        if r.speedup_int8_default is not None:
            sp += f" (int8 {r.speedup_int8_default.median:.2f}×)"
        limit = ("–" if r.ideal_prefix_ms_per_image is None else
                 f"{r.ideal_prefix_ms_per_image:.4f}")
        eff_limit = "–" if r.efficiency_prefix is None else f"{r.efficiency_prefix.median:.3f}"
        ideal = ("–" if r.ideal_flops_ms_per_image is None else
                 f"{r.ideal_ms_per_image or float('nan'):.4f} / {r.ideal_flops_ms_per_image:.4f}")
        eff = ("–" if r.efficiency_flops is None else
               f"{r.efficiency.median if r.efficiency else float('nan'):.3f} / "
               f"{r.efficiency_flops.median:.3f}")
        mem = ("–" if r.peak_rss_mb is None else
               f"{r.peak_rss_mb:.0f} ({r.peak_rss_delta_mb or 0:+.0f})")
        out.append(
            f"| {r.system} | {r.ms.median:.4f} [{r.ms.min:.4f}–{r.ms.max:.4f}] | "
            f"{r.images_per_s:,.0f} | {sp} | {_fmt_acc(r.accuracy)} | {_fmt_hist(r.exit_histogram)} "
            f"| {r.gflops_per_image:.4f} | {ideal} | {eff} | {limit} | {eff_limit} | {mem} |"
        )
    return "\n".join(out)


def render_paper_table(rows: Sequence[SystemResult]) -> str:
    """Thresholds, accuracy, GFLOPs, FLOPs reduction, ms/image, speed-up (d-gate Table 1)."""
    full = next((r for r in rows if r.kind == "full"), None)
    out = ["| model | thresholds | accuracy | GFLOPs | FLOPs reduction | ms/image | speed-up |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.kind == "full":
            name = ("full model, default ONNX Runtime session" if r.system == FULL_DEFAULT
                    else "original (full model)")
            out.append(f"| {name} | – | {_fmt_acc(r.accuracy)} | "
                       f"{r.gflops_per_image:.4f} | – | {r.ms.median:.4f} | – |")
            continue
        t = ", ".join("inf" if not math.isfinite(v) else f"{v:.3g}" for v in r.thresholds or [])
        red = ("–" if full is None else
               f"{100 * (r.gflops_per_image / full.gflops_per_image - 1):+.1f} %")
        sp = "–" if r.speedup is None else f"{r.speedup.median:.2f}×"
        out.append(f"| {r.system} | ({t}) | {_fmt_acc(r.accuracy)} | {r.gflops_per_image:.4f} | "
                   f"{red} | {r.ms.median:.4f} | {sp} |")
    return "\n".join(out)


def plot_results(results: Sequence[SystemResult], path: str | Path, title: str = "") -> Path:
    """Write a PNG: ms/image vs batch size (log axes), ideal (time share) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    for sys_id in dict.fromkeys(r.system for r in results):
        rows = sorted((r for r in results if r.system == sys_id), key=lambda r: r.batch_size)
        x = [r.batch_size for r in rows]
        y = np.array([r.ms.median for r in rows])
        err = np.array([[r.ms.median - r.ms.min for r in rows], [r.ms.max - r.ms.median for r in rows]])
        line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=sys_id)
        ideal = [r.ideal_ms_per_image for r in rows]
        if rows[0].framework == "onnx" and all(v is not None for v in ideal):
            ax.plot(x, ideal, linestyle="--", color=line[0].get_color(), alpha=0.7,
                    label=f"{sys_id}: ideal (full × time share)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r.batch_size for r in results})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms / image (median, min–max)")
    if title:
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
