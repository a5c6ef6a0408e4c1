"""``dgconvert predict``: run a bundle on data, write labels / exit stage / score."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from dgconvert.cli.common import backend_option, friendly_errors, parse_floats, threads_option


def format_histogram(counts: np.ndarray, width: int = 40) -> str:
    """A text bar chart of samples per exit stage."""
    total = max(int(counts.sum()), 1)
    lines = []
    for k, c in enumerate(counts):
        bar = "#" * round(width * c / total)
        lines.append(f"  stage {k}: {int(c):7d} ({100 * c / total:5.1f} %) {bar}")
    return "\n".join(lines)


@click.command("predict")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, help="Images: fashion-mnist:test, a .npz, idx files or an image folder.")
@backend_option
@threads_option
@click.option("--thresholds", default=None, help="Comma-separated per-gate thresholds (default: the bundle's).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write labels, exit_stage, scores to .npz or .json.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Scale out with Ray Data (the cluster at RAY_ADDRESS, else a local Ray); "
              "needs the serve extra.")
@click.option("--ray-workers", type=int, default=2, show_default=True,
              help="Ray Data actors, one runner each (with --ray).")
@friendly_errors
def predict_cmd(
    bundle: Path, data: str, backend: str, threads: int | None, thresholds: str | None,
    batch_size: int, output: Path | None, use_ray: bool, ray_workers: int,
) -> None:
    """Predict with early exits; prints accuracy (when labels exist) and the exit histogram."""
    from tqdm.auto import tqdm

    from dgconvert.data import load_dataset
    from dgconvert.runtime import GatedRunner

    opts = {"threads": threads} if threads else {}
    runner = GatedRunner(bundle, backend=backend, thresholds=parse_floats(thresholds),
                         max_batch=batch_size, **opts)
    ds = load_dataset(data, num_classes=runner.bundle.num_classes)
    click.echo(f"backend: {runner.backend.describe()} ({runner.backend_reason})")
    for line in runner.backend.fast_paths_off():
        click.echo(f"warning: fast path off: {line}", err=True)
    if use_ray:
        from dgconvert.serve.ray_data import predict_dataset

        parts = [predict_dataset(bundle, ds.images, workers=ray_workers, batch_size=batch_size,
                                 thresholds=runner.thresholds, threads=threads)]
    else:
        parts = [runner.predict(xb) for xb, _ in tqdm(
            ds.batches(batch_size), desc="predict", total=-(-len(ds) // batch_size),
            leave=False)]
    labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64)
    exits = np.concatenate([p.exit_stage for p in parts]) if parts else np.zeros(0, np.int64)
    scores = np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32)
    hist = np.bincount(exits, minlength=runner.bundle.num_stages)
    click.echo(f"{len(labels)} images, thresholds {runner.thresholds}")
    if ds.labels is not None and len(labels):
        click.echo(f"accuracy: {100 * float((labels == ds.labels).mean()):.2f} %")
    costs = np.asarray(runner.bundle.exit_costs())
    if len(labels):
        share = float((hist * costs).sum() / (len(labels) * costs[-1]))
        click.echo(f"average cost: {100 * share:.1f} % of the full model's FLOPs")
    click.echo("exit histogram:\n" + format_histogram(hist))
    rows = [int(v) for v in hist[::-1].cumsum()[::-1]] if use_ray else runner.stats
    click.echo(f"rows processed per stage: {rows}")
    if output:
        _write_predictions(output, labels, exits, scores)
        click.echo(f"wrote {output}")


def _write_predictions(path: Path, labels: np.ndarray, exits: np.ndarray, scores: np.ndarray) -> None:
    from dgconvert.cli.common import write_json
    from dgconvert.core.io import atomic_write

    if path.suffix == ".json":
        write_json(path, {"labels": labels, "exit_stage": exits, "scores": scores})
    elif path.suffix == ".npz":
        def save(p: Path) -> None:
            with open(p, "wb") as f:
                np.savez(f, labels=labels, exit_stage=exits, scores=scores)

        atomic_write(path, save)
    else:
        raise click.BadParameter(f"output {path} must end in .npz or .json", param_hint="-o")
