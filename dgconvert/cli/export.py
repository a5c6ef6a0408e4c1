"""``dgconvert export``: gated checkpoint -> verified staged ONNX bundle."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors


@click.command("export")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle directory to write (default: MODEL with suffix .dg).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled GatedNetwork (runs code from the file: trusted files only).")
@click.option("--data", default=None,
              help="Real inputs to verify against PyTorch, e.g. fashion-mnist:test (default: random inputs).")
@click.option("--verify-samples", type=int, default=256, show_default=True,
              help="How many samples of --data to verify on.")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the comparison with PyTorch (not recommended).")
@friendly_errors
def export_cmd(
    model: Path, output: Path | None, force: bool, trust_pickle: bool, data: str | None,
    verify_samples: int, atol: float, rtol: float, no_verify: bool,
) -> None:
    """Export a gated network (MODEL.pt from `dgconvert gates fit` or dgconvert.save) to a
    bundle: one ONNX graph per stage with its gate fused, plus full.onnx, verified."""
    import torch

    import dgconvert as dg
    from dgconvert.core.bundle import file_sha256
    from dgconvert.core.manifest import portable
    from dgconvert.core.preprocess import normalize

    net = dg.load(model, trust_pickle=trust_pickle)
    out = output or model.with_suffix(".dg")
    verify_input = None
    if data:
        ds = dg.load_dataset(data, num_classes=net.num_classes)
        imgs = ds.images[:verify_samples]
        x = normalize(imgs, net.normalization) if imgs.dtype.kind == "u" else imgs
        verify_input = torch.from_numpy(x.astype("float32"))

    def show(report: object) -> None:
        worst = ", ".join(f"{k} {v:.2g}" for k, v in report.max_abs.items())  # type: ignore[attr-defined]
        click.echo(f"verified {report.checks} outputs against PyTorch; max abs diff: {worst}")  # type: ignore[attr-defined]

    bundle = dg.export(
        net, out, verify_input=verify_input, force=force, verify=not no_verify,
        atol=atol, rtol=rtol, progress=True, on_report=show,
        source={"checkpoint": model.name, "checkpoint_sha256": file_sha256(model),
                "verified_on": portable(data) if data else "random inputs"},
    )
    click.echo(f"wrote {bundle.path} ({bundle.num_stages} stages, {bundle.num_gates} gates)")
