"""``dgconvert info``: a readable summary of a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors
from dgconvert.core.gates import GRID_POOLS


def describe_bundle(path: Path) -> str:
    """Stages, FLOPs share, gates, thresholds, calibration, engines."""
    from dgconvert.core.bundle import Bundle

    b = Bundle.load(path)
    m = b.manifest
    costs = b.exit_costs()
    full = costs[-1] or 1.0
    lines = [
        f"bundle {b.path} (schema {m.schema_version}, dgconvert {m.dgconvert_version}, "
        f"created {m.created})",
        f"input: {m.input.shape} {m.input.dtype}, normalization {m.input.normalization}",
        f"classes ({b.num_classes}): {', '.join(b.classes)}",
        f"full model: {b.full_flops / 1e6:.2f} MFLOPs/image",
        "",
        "stage  file           MFLOPs  cum.share  gate                      threshold",
    ]
    for k, s in enumerate(m.stages):
        g = s.gate
        pool = g.extra.get("pool") if g else None
        pooled = f", pool {pool}" if pool in GRID_POOLS else ""
        gate = f"{g.type} (score {g.score}{pooled}, {g.flops} FLOPs)" if g else "final"
        thr = f"{b.thresholds[k]:.4g}" if k < b.num_gates else "-"
        lines.append(
            f"{k:5d}  {s.file:<13s}  {s.flops / 1e6:6.2f}  {100 * costs[k] / full:8.1f} %  "
            f"{gate:<24s}  {thr}"
        )
    crashing = [s.index for s in m.stages if not s.empty_batch]
    if crashing:
        lines.append(f"warning: ONNX Runtime dies on empty batches of stage(s) {crashing} "
                     "(found at export): the runner never runs them empty; the ONNX Runtime "
                     "one-session chain is off")
    t = m.thresholds
    lines.append(f"\nthresholds from: {t.source} ({t.updated})")
    cal = m.calibration
    if cal:
        lines.append(
            f"calibration: target {cal.get('target_accuracy')}, accuracy {cal.get('accuracy')}, "
            f"cost fraction {cal.get('cost_fraction')}, method {cal.get('method')}"
        )
    engines = m.engines
    lines.append(f"engines: {', '.join(engines) if engines else 'none (run `dgconvert build` on a GPU)'}")
    q = m.quantization
    lines.append(f"precision: {m.precision}")
    if q is not None:
        lines.append(f"  from fp32 bundle {q.source_bundle!r} (digest {q.source_digest[:16]}…), "
                     f"calibrated on {q.calibration_images} images of {q.calibration_data or '?'}")
        lines.append("  quantizer: " + ", ".join(f"{k} {v}" for k, v in q.settings.items()))
        v = q.verification
        if v:
            lines.append(f"  checked on {v.get('images')} images: label agreement per stage "
                         f"{[round(100 * a, 2) for a in v.get('stage_agreement', [])]} %, full "
                         f"model {100 * v.get('full_agreement', 0):.2f} %, score correlation "
                         f"per gate {[round(c, 4) for c in v.get('score_correlation', [])]}")
    gn = m.gaternet
    if gn is not None:
        from dgconvert.core.gates import format_filter_gates

        lines.append(f"\nGaterNet: gater {gn.gater.get('factory')} {gn.gater.get('kwargs', {})}, "
                     f"bottleneck {gn.gater.get('bottleneck')}")
        if gn.samples:
            lines.append(f"gate kinds on {gn.samples} calibration samples ({gn.data or '?'}):")
            lines.append(format_filter_gates(gn.layers))
            lines.append(f"pruned: {100 * gn.pruned_share:.1f} % of the gated filters; "
                         f"{gn.flops_masked / 1e6:.2f} -> {gn.flops_pruned / 1e6:.2f} MFLOPs/image "
                         f"({100 * (1 - gn.flops_pruned / max(gn.flops_masked, 1)):.1f} % fewer)")
        else:
            lines.append("not pruned (export with --prune-data to count gate kinds and prune)")
    return "\n".join(lines)


@click.command("info")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GaterNet bundles: write the per-layer gate kinds as a PNG (needs matplotlib).")
@friendly_errors
def info_cmd(bundle: Path, plot_path: Path | None) -> None:
    """Summarise a bundle: stages, FLOPs share, gates, thresholds, engines (and a GaterNet's
    gate kinds per layer)."""
    click.echo(describe_bundle(bundle))
    if plot_path is not None:
        from dgconvert.bench.gate_kinds import plot_gate_kinds
        from dgconvert.core.bundle import Bundle

        gn = Bundle.load(bundle).manifest.gaternet
        if gn is None:
            raise click.UsageError(f"{bundle} is not a GaterNet bundle; --plot shows a "
                                   "GaterNet's gate kinds. Fix: drop --plot.")
        click.echo(f"wrote {plot_gate_kinds(gn.layers, plot_path)}")
