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
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True,
              help="ONNX exporter: auto = torch.export-based, falling back to TorchScript-based "
                   "for a stage it fails on or exports wrongly.")
@click.option("--allow-near-chance", is_flag=True,
              help="Export even when the backbone scores near chance on labelled --data.")
@friendly_errors
def export_cmd(
    model: Path, output: Path | None, force: bool, trust_pickle: bool, data: str | None,
    verify_samples: int, atol: float, rtol: float, no_verify: bool, exporter: str,
    allow_near_chance: bool,
) -> None:
    """Export a gated network (MODEL.pt from `dgconvert gates fit` or dgconvert.save) to a
    bundle: one ONNX graph per stage with its gate fused, plus full.onnx, verified."""
    import torch

    import dgconvert as dg
    from dgconvert.preprocess import normalize

    net = dg.load(model, trust_pickle=trust_pickle)
    out = output or model.with_suffix(".dg")
    verify_input = None
    if data:
        ds = dg.load_dataset(data, num_classes=net.num_classes)
        imgs = ds.images[:verify_samples]
        x = normalize(imgs, net.normalization) if imgs.dtype.kind == "u" else imgs
        verify_input = torch.from_numpy(x.astype("float32"))
        if ds.labels is not None and not allow_near_chance:
            from dgconvert.gating.fit import check_backbone_accuracy

            with torch.no_grad():
                logits = net.eval()(verify_input)
            acc = check_backbone_accuracy(
                logits.numpy(), ds.labels[:verify_samples], normalization=net.normalization,
                source=f"{data} (first {len(verify_input)})",
                flag="`dgconvert gates fit --normalization`",
            )  # fmt: skip
            click.echo(f"backbone accuracy on {data}: {100 * acc:.2f} % ({len(verify_input)} samples)")

    def show(report: object) -> None:
        worst = ", ".join(f"{k} {v:.2g}" for k, v in report.max_abs.items())  # type: ignore[attr-defined]
        click.echo(f"verified {report.checks} outputs against PyTorch; max abs diff: {worst}")  # type: ignore[attr-defined]

    bundle = dg.export(
        net, out, verify_input=verify_input, force=force, verify=not no_verify,
        atol=atol, rtol=rtol, progress=True, on_report=show, exporter=exporter,
        source={"checkpoint": str(model), "verified_on": data or "random inputs"},
    )
    click.echo(f"wrote {bundle.path} ({bundle.num_stages} stages, {bundle.num_gates} gates)")
