"""Calibration results: the JSON record, a Markdown table like the d-gate paper's Table 1,
and the accuracy-vs-cost frontier plot (matplotlib imported only when plotting).

Thresholds of +inf (gate off) are written as ``null`` in JSON; :func:`decode_thresholds`
turns them back. Accuracies are fractions in [0, 1]; costs are in ``exit_costs`` units.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgconvert.calibrate.bounds import BoundResult
from dgconvert.calibrate.selection import Estimate
from dgconvert.core.exits import Outcome
from dgconvert.core.manifest import encode_thresholds

ROW_TITLES = {
    "full": "Original (full model)",
    "ours": "dgconvert",
    "search": "dgconvert (search, uncertified)",
    "sequential": "Sequential (d-gate paper)",
    "shared": "Shared threshold",
}


@dataclass(frozen=True)
class SplitStats:
    """How one threshold vector does on one data split."""

    accuracy: float
    cost: float  # mean cost per sample
    cost_fraction: float
    exit_fractions: tuple[float, ...]
    n: int

    @classmethod
    def of(cls, outcome: Outcome) -> SplitStats:
        n = len(outcome.result.labels)
        fractions = tuple(float(f) for f in outcome.exit_fractions)
        return cls(outcome.accuracy, outcome.cost, outcome.cost_fraction, fractions, n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "cost": self.cost,
            "cost_fraction": self.cost_fraction,
            "exit_fractions": list(self.exit_fractions),
            "n": self.n,
        }


@dataclass(frozen=True)
class OperatingPoint:
    """A named threshold vector evaluated on the calibration and held-out splits."""

    name: str  # "full", "ours", "search", "sequential" or "shared"
    thresholds: tuple[float, ...]
    feasible: bool  # meets the target on the calibration split
    calibration: SplitStats
    heldout: SplitStats | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": encode_thresholds(self.thresholds),
            "feasible": self.feasible,
            "calibration": self.calibration.to_dict(),
            "heldout": None if self.heldout is None else self.heldout.to_dict(),
        }


@dataclass(frozen=True)
class FrontierPoint:
    """One non-dominated vector of the calibration-split frontier."""

    thresholds: tuple[float, ...]
    accuracy: float
    cost_fraction: float


@dataclass(frozen=True)
class CalibrationResult:
    """Everything :func:`dgconvert.calibrate.calibrate` found."""

    ours: OperatingPoint
    full: OperatingPoint
    sequential: OperatingPoint
    shared: OperatingPoint
    search: OperatingPoint  # the search's choice (differs from ``ours`` with a bound)
    target_accuracy: float
    method: str
    exit_costs: tuple[float, ...]
    cost_unit: str
    confidence: float | None
    bound: BoundResult | None
    frontier: tuple[FrontierPoint, ...]
    holdout: float
    seed: int
    seconds: float
    max_drop: float | None = None  # fraction; None: absolute target
    expected: Estimate | None = None  # unseen estimate from samples not used to choose
    promise: str = ""  # what the thresholds promise, one sentence
    selection: Mapping[str, Any] = field(default_factory=dict)  # sizes and walk/test details
    context: Mapping[str, Any] = field(default_factory=dict)  # bundle workflow: data, digests
    measured_ms_per_image: Mapping[str, float] | None = None  # timed rows (--measure)
    family: tuple[tuple[float, ...], ...] = ()  # the path walked or tested, in order

    @property
    def mode(self) -> str:
        """``"expected"`` (default) or ``"guarantee"`` (with a confidence)."""
        return "expected" if self.confidence is None else "guarantee"

    @property
    def fallback(self) -> bool:
        """Nothing gated passed (or was certified): the full model was returned."""
        return bool(self.selection.get("fallback", False))

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.ours.thresholds

    @property
    def accuracy(self) -> float:
        return self.ours.calibration.accuracy

    @property
    def full_accuracy(self) -> float:
        return self.full.calibration.accuracy

    @property
    def cost_fraction(self) -> float:
        return self.ours.calibration.cost_fraction

    @property
    def heldout_accuracy(self) -> float | None:
        return None if self.ours.heldout is None else self.ours.heldout.accuracy

    @property
    def heldout_cost_fraction(self) -> float | None:
        return None if self.ours.heldout is None else self.ours.heldout.cost_fraction

    def points(self) -> dict[str, OperatingPoint]:
        """Rows of the comparison, in table order."""
        rows = {"full": self.full, "ours": self.ours}
        if self.search.thresholds != self.ours.thresholds:
            rows["search"] = self.search
        rows.update(sequential=self.sequential, shared=self.shared)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (+inf thresholds as null)."""
        held, full_held = self.ours.heldout, self.full.heldout
        return {
            "thresholds": encode_thresholds(self.thresholds),
            "target_accuracy": self.target_accuracy,
            "accuracy": self.accuracy,
            "full_accuracy": self.full_accuracy,
            "heldout_accuracy": self.heldout_accuracy,
            "heldout_full_accuracy": None if full_held is None else full_held.accuracy,
            "cost": self.ours.calibration.cost,
            "cost_fraction": self.cost_fraction,
            "heldout_cost_fraction": self.heldout_cost_fraction,
            "exit_fractions": list(self.ours.calibration.exit_fractions),
            "heldout_exit_fractions": None if held is None else list(held.exit_fractions),
            "method": self.method,
            "confidence": self.confidence,
            "bound": None if self.bound is None else self.bound.to_dict(),
            "comparison": {k: p.to_dict() for k, p in self.points().items() if k != "ours"},
            "frontier": [
                {
                    "thresholds": encode_thresholds(f.thresholds),
                    "accuracy": f.accuracy,
                    "cost_fraction": f.cost_fraction,
                }
                for f in self.frontier
            ],
            "exit_costs": list(self.exit_costs),
            "cost_unit": self.cost_unit,
            "n_calibration": self.ours.calibration.n,
            "n_heldout": 0 if held is None else held.n,
            "holdout": self.holdout,
            "seed": self.seed,
            "seconds": self.seconds,
            "mode": self.mode,
            "promise": self.promise,
            "max_drop": self.max_drop,
            "expected": None if self.expected is None else self.expected.to_dict(),
            "selection": dict(self.selection),
            "fallback": self.fallback,
            **dict(self.context),
            "measured_ms_per_image": (
                None if self.measured_ms_per_image is None else dict(self.measured_ms_per_image)
            ),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _fmt_thresholds(point: OperatingPoint) -> str:
    if all(math.isinf(t) for t in point.thresholds):
        return "—"
    return "dg(" + ", ".join("off" if math.isinf(t) else f"{t:.4g}" for t in point.thresholds) + ")"


def _cost_columns(unit: str, stats: SplitStats, full: SplitStats) -> tuple[str, str]:
    if unit == "flops":
        saved = "–" if stats is full else f"{1 - stats.cost / full.cost:.2%}"
        return f"{stats.cost / 1e9:.3f}", saved
    if unit == "ms":
        return f"{stats.cost:.3f}", f"{full.cost / stats.cost:.2f}×" if stats.cost > 0 else "–"
    return f"{stats.cost:.4g}", "–" if stats is full else f"{1 - stats.cost / full.cost:.2%}"


_COST_HEADERS = {
    "flops": ("GFLOPs/image", "FLOPs reduction"),
    "ms": ("ms/image (model)", "Speed-up (model)"),
}


def markdown_table(
    result: CalibrationResult,
    *,
    split: str = "auto",
    latency_ms: Mapping[str, float] | None = None,
) -> str:
    """Markdown comparison table in the style of the d-gate paper's Table 1.

    ``split``: ``"heldout"``, ``"calibration"`` or ``"auto"`` (held-out when there is one).
    ``latency_ms``: measured ms/image per row name (``"full"``, ``"ours"``, ...); adds
    ms/image and speed-up columns.
    """
    if split == "auto":
        split = "calibration" if result.ours.heldout is None else "heldout"
    if split not in ("heldout", "calibration") or (
        split == "heldout" and result.ours.heldout is None
    ):
        raise ValueError(
            f"split must be 'heldout' (with held-out data), 'calibration' or 'auto', got {split!r}"
        )
    rows = result.points()
    stage = " / ".join(str(k) for k in range(len(result.exit_costs)))
    cost_h = _COST_HEADERS.get(result.cost_unit, ("Cost/image", "Cost reduction"))
    header = ["Model", "Thresholds", "Acc.", *cost_h, f"Exits % (stage {stage})"]
    if latency_ms:
        header += ["ms/image", "Speed-up"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    full_stats = getattr(result.full, split)
    for name, point in rows.items():
        stats = getattr(point, split)
        cost, saving = _cost_columns(result.cost_unit, stats, full_stats)
        mark = "" if point.feasible else " †"
        cells = [
            ROW_TITLES[name],
            _fmt_thresholds(point),
            f"{stats.accuracy:.2%}{mark}",
            cost,
            saving,
            " / ".join(f"{100 * f:.1f}" for f in stats.exit_fractions),
        ]
        if latency_ms:
            ms, base = latency_ms.get(name), latency_ms.get("full")
            cells.append("–" if ms is None else f"{ms:.3f}")
            cells.append(
                "–" if ms is None or base is None or name == "full" else f"{base / ms:.2f}×"
            )
        lines.append("| " + " | ".join(cells) + " |")
    n = full_stats.n
    note = (
        f"\n{split.capitalize()} split, n = {n}; target accuracy {result.target_accuracy:.2%} "
        f"(method: {result.method})."
    )
    if not all(p.feasible for p in rows.values()):
        note += " † misses the target on the calibration split."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_frontier(result: CalibrationResult, path: str | Path, *, title: str | None = None) -> Path:
    """Save the accuracy-vs-cost-fraction frontier (calibration split) with the chosen
    operating points marked; returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pts = sorted(result.frontier, key=lambda f: f.cost_fraction)
    ax.plot(
        [f.cost_fraction for f in pts],
        [100 * f.accuracy for f in pts],
        "-",
        color="0.6",
        marker=".",
        label="frontier (calibration)",
    )
    styles = {
        "full": ("o", "k"),
        "ours": ("*", "tab:red"),
        "search": ("P", "tab:orange"),
        "sequential": ("s", "tab:blue"),
        "shared": ("^", "tab:green"),
    }
    for name, point in result.points().items():
        marker, color = styles[name]
        cal = point.calibration
        ax.plot(
            cal.cost_fraction,
            100 * cal.accuracy,
            marker,
            color=color,
            markersize=10,
            linestyle="none",
            label=ROW_TITLES[name],
        )
        if point.heldout is not None:
            ax.plot(
                point.heldout.cost_fraction,
                100 * point.heldout.accuracy,
                marker,
                markerfacecolor="none",
                color=color,
                markersize=10,
                linestyle="none",
            )
    ax.axhline(
        100 * result.target_accuracy, color="tab:red", linestyle="--", linewidth=0.8, label="target"
    )
    ax.set_xlabel("cost fraction of the full model")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy vs cost (filled: calibration, hollow: held-out)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120, format="png")
    return out
