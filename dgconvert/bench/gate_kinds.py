"""The paper's Figure 2 for a GaterNet bundle: per gated layer, the share of always-on,
always-off and input-dependent filter gates (matplotlib imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dgconvert.core.gates import FILTER_GATE_KINDS, FilterGateLayer

_COLORS = {"always_on": "tab:green", "always_off": "tab:gray", "input_dependent": "tab:orange"}


def plot_gate_kinds(layers: Sequence[FilterGateLayer], path: str | Path, *,
                    title: str | None = None) -> Path:
    """Save a stacked bar chart (one bar per gated layer, in %) as PNG; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not layers:
        raise ValueError("no gate kinds to plot: the bundle records none (export the GaterNet "
                         "with --prune-data to count them)")
    fig = Figure(figsize=(max(4.8, 0.9 * len(layers) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(layers))
    bottom = [0.0] * len(layers)
    for kind in FILTER_GATE_KINDS:
        vals = [100 * lay.shares()[kind] for lay in layers]
        ax.bar(xs, vals, bottom=bottom, color=_COLORS[kind], label=kind.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(list(xs), [lay.name for lay in layers], rotation=30, ha="right",
                  fontsize="small")
    ax.set_ylabel("share of the layer's gates (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "GaterNet gate kinds per gated layer")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120, format="png")
    return out
