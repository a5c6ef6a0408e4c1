"""``dgconvert doctor``: what each backend needs and what this machine has."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import friendly_errors


@click.command("doctor")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@friendly_errors
def doctor_cmd(bundle: Path | None) -> None:
    """Print versions, GPUs, ONNX Runtime providers and, per backend, what is missing (with
    the install command). With BUNDLE: its engines and what backend=auto would pick."""
    from dgconvert.runtime.doctor import collect, format_report

    click.echo(format_report(collect(bundle)))
