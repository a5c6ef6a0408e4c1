"""``dgconvert build``: TensorRT engines for this GPU, one per stage (GPU machine)."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors


@click.command("build")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True, help="Engine precision (int8 needs --data for calibration).")
@click.option("--max-batch", type=int, default=256, show_default=True,
              help="Largest batch a stage accepts (the profiles' max).")
@click.option("--opt-batch", type=int, default=None,
              help="Batch TensorRT tunes for (default: --max-batch); later stages tune for the "
                   "expected survivors when the bundle is calibrated.")
@click.option("--workspace", default=None,
              help="Builder workspace limit, e.g. 512M or 4G (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file to reuse and update (speeds up rebuilds).")
@click.option("--data", default=None,
              help="Calibration images for int8, e.g. fashion-mnist:train[:2000].")
@click.option("--calib-samples", type=int, default=512, show_default=True,
              help="How many --data images calibrate int8.")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index.")
@click.option("--no-full", is_flag=True, help="Skip the full (ungated) model's engine.")
@click.option("--no-tf32", is_flag=True,
              help="Clear BuilderFlag.TF32: FP32 layers use exact FP32 math (slower on Ampere+).")
@friendly_errors
def build_cmd(
    bundle: Path, precision: str, max_batch: int, opt_batch: int | None, workspace: str | None,
    timing_cache: Path | None, data: str | None, calib_samples: int, device: int, no_full: bool,
    no_tf32: bool,
) -> None:
    """Build TensorRT engines for BUNDLE on this GPU into BUNDLE/engines/<gpu>_<sm>_<trt>/."""
    from dgconvert.convert.tensorrt import BuildOptions, build_engines, parse_size

    opts = BuildOptions(
        precision=precision, max_batch=max_batch, opt_batch=opt_batch,
        workspace=parse_size(workspace), timing_cache=timing_cache, data=data,
        calib_samples=calib_samples, device=device, full=not no_full, tf32=not no_tf32,
        log=click.echo,
    )
    record = build_engines(bundle, opts)
    click.echo(f"built {len(record['stages'])} stage engines ({record['precision']}, "
               f"TensorRT {record['tensorrt']}, max batch {record['max_batch']}) for {record['gpu']}")
