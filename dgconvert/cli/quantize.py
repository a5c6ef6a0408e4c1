"""``dgconvert quantize``: an int8 copy of a bundle for the CPU, checked against its source."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors, write_json


@click.command("quantize")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The int8 bundle to write (a new directory).")
@click.option("--data", required=True,
              help="Calibration images (labelled for accuracy), not the test set, e.g. "
                   "'fashion-mnist:train[50000:]'. Images past --calibration-images check the result.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="Int8 weight scales per output channel or one per tensor.")
@click.option("--calibration-images", type=int, default=None,
              help="Images of --data that set the activation ranges (default 1024).")
@click.option("--keep-fp32", type=click.Choice(["gates", "none"]), default="gates",
              show_default=True, help="Leave the gate heads in float32 (gates) or quantize all.")
@click.option("--calibrate-method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True,
              help="How ONNX Runtime sets the activation ranges from the calibration images.")
@click.option("--weights", type=click.Choice(["auto", "int8", "uint8"]), default="auto",
              show_default=True,
              help="Weight type: int8 (ORT's default), uint8 (no saturation on x86 CPUs "
                   "without VNNI), auto: uint8 exactly there.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the check against the fp32 source as JSON.")
@click.option("--force", is_flag=True, help="Replace --output if it exists.")
@friendly_errors
def quantize_cmd(bundle: Path, output: Path, data: str, per_channel: bool,
                 calibration_images: int | None, keep_fp32: str, calibrate_method: str,
                 weights: str, json_out: Path | None, force: bool) -> None:
    """Quantize every stage graph and full.onnx to int8 (ONNX Runtime static quantization,
    QDQ), calibrated stage by stage on --data through the bundle's preprocessing; check the
    result against BUNDLE (label agreement, score correlation, accuracy) and write it only
    when every check passes. Calibrate the new bundle afterwards (`dgconvert calibrate`)."""
    from dgconvert.convert.quantize import DEFAULT_IMAGES, QuantizeSettings, quantize_bundle
    from dgconvert.core.bundle import Bundle
    from dgconvert.data import load_dataset

    src = Bundle.load(bundle)
    ds = load_dataset(data, num_classes=src.num_classes)
    settings = QuantizeSettings(per_channel, DEFAULT_IMAGES if calibration_images is None
                                else calibration_images, keep_fp32, calibrate_method,
                                weights=weights)
    out, report = quantize_bundle(src, output, ds.images, ds.labels, data=data,
                                  settings=settings, force=force,
                                  log=lambda msg: click.echo(msg, err=True))
    click.echo("\n".join(report.lines()))
    if json_out:
        write_json(json_out, report.to_dict())
    click.echo(f"wrote {out.path} (int8); calibrate it: dgconvert calibrate {out.path} --data ...")
