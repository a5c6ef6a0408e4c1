"""``dgconvert calibrate``: per-gate thresholds reaching a target accuracy at least cost."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from dgconvert.bench.calibration import gate_costs_ms, measure_rows
from dgconvert.calibrate import markdown_table, plot_frontier
from dgconvert.calibrate.workflow import calibrate_bundle, load_data, summary, write_calibration
from dgconvert.cli.common import backend_option, friendly_errors, threads_option, write_json


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="Labelled calibration data (not the test set), e.g. 'fashion-mnist:train[50000:]'.")
@click.option("--target-acc", type=float, default=None, help="Target accuracy in percent, e.g. 94.7.")
@click.option("--max-drop", type=float, default=None, help="Or: at most this many points below the full model's accuracy.")
@click.option("--drop-vs", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Int8 bundles: --max-drop is below the fp32 source's full model or the int8 one (both are reported).")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Int8 bundles: the fp32 bundle it was quantized from (default: found beside it by the digest its manifest records).")
@click.option("--confidence", type=float, default=None,
              help="Guarantee the target on unseen data with this probability (e.g. 0.9): Learn-then-Test on the held-out part (paired exact test with --max-drop; falls back to the full model when nothing is certified).")
@click.option("--holdout", type=float, default=None,
              help="Share of the data held out: for the unseen-data estimate (default 0.3) or, with --confidence, for the test (default 0.5).")
@click.option("--cost", "cost_kind", type=click.Choice(["flops", "latency"]), default="flops", show_default=True,
              help="Cost per exit: manifest FLOPs, or latency measured on the backend (each stage and each gate's head + compaction; gates that do not pay for themselves are turned off).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size for --cost latency and --measure.")
@click.option("--measure", is_flag=True, help="Also measure ms/image and speed-up of each row on the backend.")
@backend_option
@threads_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the accuracy-vs-cost frontier as PNG.")
@click.option("--dry-run", is_flag=True, help="Report only; write nothing into the bundle (no thresholds, no records cache).")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def calibrate_cmd(
    bundle: Path, data: str, target_acc: float | None, max_drop: float | None,
    drop_vs: str, source: Path | None, confidence: float | None, holdout: float | None, cost_kind: str, batch_size: int, measure: bool,
    backend: str, threads: int | None, json_out: Path | None, plot: Path | None,
    dry_run: bool, seed: int,
) -> None:
    """Pick thresholds with the lowest average cost that reach --target-acc (or --max-drop)
    on unseen data, write them into the bundle's manifest (atomically) with the record."""
    if (target_acc is None) == (max_drop is None):
        raise click.UsageError("give exactly one of --target-acc (percent) or --max-drop (points)")
    opts = {"threads": threads} if threads else {}
    b, ds = load_data(bundle, data)
    gate_costs = None
    if cost_kind == "latency":
        click.echo(f"timing each stage and each gate on the backend at batch {batch_size} ...")
        gate_costs = gate_costs_ms(b, ds.images, backend=backend, batch_size=batch_size, **opts)
    result = calibrate_bundle(
        b, data, target_accuracy=None if target_acc is None else target_acc / 100.0,
        max_drop=None if max_drop is None else max_drop / 100.0, confidence=confidence,
        holdout=holdout, gate_costs=gate_costs, cost=cost_kind, backend=backend, seed=seed,
        write=False, progress=True, dataset=ds, drop_vs=drop_vs, source=source, **opts,
    )
    if measure:
        ms = measure_rows(b, ds.images, result, batch_size, backend, **opts)
        result = replace(result, measured_ms_per_image=ms)
    if not dry_run:
        write_calibration(b, result)
    click.echo(markdown_table(result, latency_ms=result.measured_ms_per_image))
    if json_out:
        write_json(json_out, result.to_dict())
        click.echo(f"wrote {json_out}")
    if plot:
        plot_frontier(result, plot)
        click.echo(f"wrote {plot}")
    click.echo(summary(result, written=not dry_run))
