"""``dgconvert bench``: time the gated runtime against the full model (and PyTorch)."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors, parse_floats, parse_ints, write_json
from dgconvert.runtime.onnxruntime_backend import SPINNING_NAMES


def _backends() -> list[str]:
    from dgconvert.runtime import BACKENDS

    return ["auto", *BACKENDS]


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True,
              help="Labelled images, e.g. fashion-mnist:test (accuracy needs labels).")
@click.option("--batch-size", "batch_sizes", default="1,8,64,256", show_default=True,
              help="Comma-separated batch sizes to sweep.")
@click.option("--backend", type=click.Choice(_backends()), default="auto", show_default=True,
              help="Runtime backend for the full model and the gated runner.")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads for ONNX Runtime and PyTorch (default: all usable cores).")
@click.option("--thresholds", default=None,
              help="Comma-separated per-gate thresholds (default: the bundle's).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Gated PyTorch checkpoint (dgconvert.save) for the torch-full and naive "
                   "torch-masked systems (default: the bundle's source checkpoint if it exists).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch systems.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed passes per system.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed passes first.")
@click.option("--samples", type=int, default=1024, show_default=True,
              help="Images per timed pass (rounded down to whole batches).")
@click.option("--torch-samples", type=int, default=256, show_default=True,
              help="Images per timed pass for the (slow) PyTorch systems.")
@click.option("--limit", type=int, default=None,
              help="Use only the first N images of --data (accuracy is over these).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of ms/image vs batch size (needs matplotlib).")
@click.option("--staging-overhead", is_flag=True,
              help="Also time the gated runner with every gate off (rows 'gated[nobody exits]'): "
                   "what staging costs when nobody exits.")
@click.option("--spinning", type=click.Choice(list(SPINNING_NAMES)), default=None,
              help="ONNX Runtime thread spinning for every ORT session of the run: off (workers "
                   "sleep when idle), run (spin between the operators of a run, stop at its "
                   "end), on (ORT's default; keep spinning). Default: the backend's.")
@click.option("--tune", is_flag=True,
              help="First measure which runtime path each batch size should take on this "
                   "machine (in-graph exits / one-session chain / stage by stage) and store "
                   "the choice in the bundle's manifest (runners then read it instead of "
                   "measuring at load).")
@click.option("--shared-pool/--no-shared-pool", default=True, show_default=True,
              help="On ONNX Runtime on the CPU, also time the gated runner on one shared thread "
                   "pool (share_thread_pool) in a process of its own: row 'gated-shared'.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@friendly_errors
def bench_cmd(
    bundle: Path, data: str, batch_sizes: str, backend: str, threads: int | None,
    thresholds: str | None, model: Path | None, no_torch: bool, repeats: int, warmup: int,
    samples: int, torch_samples: int, limit: int | None, json_out: Path | None, plot_out: Path | None,
    staging_overhead: bool, spinning: str | None, tune: bool, shared_pool: bool,
    no_progress: bool,
) -> None:
    """Measure ms/image, images/s, accuracy, exits, memory and efficiency (ideal / measured)
    of the gated runtime against the full model, at several batch sizes, in one run."""
    from dgconvert.bench import BenchConfig, no_exit_point, run_benchmark
    from dgconvert.bench.cli_support import pick_torch_model
    from dgconvert.core.bundle import Bundle
    from dgconvert.data import load_dataset

    b = Bundle.load(bundle)
    ds = load_dataset(data, num_classes=b.num_classes)
    if limit is not None:
        if limit < 1:
            raise click.BadParameter(f"--limit must be >= 1, got {limit}")
        ds = ds.subset(slice(0, limit))
    torch_model, note = pick_torch_model(b, model, no_torch)
    if note:
        click.echo(note, err=True)
    config = BenchConfig(batch_sizes=parse_ints(batch_sizes), repeats=repeats, warmup=warmup,
                         samples=samples, torch_samples=torch_samples,
                         progress=not no_progress)
    options = {} if spinning is None else {"spinning": SPINNING_NAMES[spinning]}
    if tune:
        from dgconvert.bench.tune import tune_paths

        choice = tune_paths(b, ds.images, backend, {**options, **(
            {"threads": threads} if threads else {})})
        click.echo(f"tuned runtime paths, written to {b.path / 'manifest.json'}: "
                   f"{choice.describe()}")
    report = run_benchmark(
        b, ds.images, ds.labels, config=config, backend=backend, threads=threads,
        thresholds=parse_floats(thresholds), model=torch_model, data_name=data,
        operating_points=no_exit_point(b) if staging_overhead else None,
        backend_options=options or None, shared_pool=shared_pool,
    )
    click.echo(report.markdown())
    if json_out:
        write_json(json_out, report.to_dict())
        click.echo(f"\nwrote {json_out}")
    if plot_out:
        report.plot(plot_out)
        click.echo(f"wrote {plot_out}")
