"""``dgconvert calibrate``: per-gate thresholds reaching a target accuracy at least cost."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import backend_option, friendly_errors, threads_option, write_json


@click.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="Labelled calibration data (not the test set), e.g. 'fashion-mnist:train[50000:]'.")
@click.option("--target-acc", type=float, default=None, help="Target accuracy in percent, e.g. 94.7.")
@click.option("--max-drop", type=float, default=None, help="Or: at most this many points below the full model on the same data.")
@click.option("--confidence", type=float, default=None,
              help="Make the target hold on unseen data with this probability (e.g. 0.95): Learn-then-Test with Clopper-Pearson p-values on the held-out part.")
@click.option("--holdout", type=float, default=0.3, show_default=True, help="Share of the data held out for testing.")
@click.option("--cost", "cost_kind", type=click.Choice(["flops", "latency"]), default="flops", show_default=True,
              help="Cost per exit: manifest FLOPs, or per-stage latency measured on the backend.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Batch size for --cost latency and --measure.")
@click.option("--measure", is_flag=True, help="Also measure ms/image and speed-up of each row on the backend.")
@backend_option
@threads_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the accuracy-vs-cost frontier as PNG.")
@click.option("--dry-run", is_flag=True, help="Report only; do not write thresholds into the bundle.")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def calibrate_cmd(
    bundle: Path, data: str, target_acc: float | None, max_drop: float | None,
    confidence: float | None, holdout: float, cost_kind: str, batch_size: int, measure: bool,
    backend: str, threads: int | None, json_out: Path | None, plot: Path | None,
    dry_run: bool, seed: int,
) -> None:
    """Pick thresholds with the lowest average cost that reach --target-acc (or --max-drop),
    write them into the bundle's manifest (atomically) with the calibration record."""
    from dgconvert.calibrate.workflow import calibrate_bundle

    if (target_acc is None) == (max_drop is None):
        raise click.UsageError("give exactly one of --target-acc (percent) or --max-drop (points)")
    opts = {"threads": threads} if threads else {}
    outcome = calibrate_bundle(
        bundle, data, target_acc=target_acc, max_drop=max_drop, confidence=confidence,
        holdout=holdout, cost=cost_kind, batch_size=batch_size, measure=measure,
        backend=backend, seed=seed, write=not dry_run, progress=True, **opts,
    )
    click.echo(outcome.table)
    if json_out:
        write_json(json_out, outcome.record)
        click.echo(f"wrote {json_out}")
    if plot:
        from dgconvert.calibrate import plot_frontier

        plot_frontier(outcome.result, plot)
        click.echo(f"wrote {plot}")
    click.echo(outcome.summary)
