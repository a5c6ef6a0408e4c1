"""``dgconvert`` command line: thin click commands over the library API.

Commands live in one module each and are imported only when invoked, so ``--help`` and
the runtime commands never import torch.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from dgconvert.core.version import __version__

# command name -> "module:attribute"
COMMANDS = {
    "export": "dgconvert.cli.export:export_cmd",
    "gates": "dgconvert.cli.gates:gates_group",
    "cuts": "dgconvert.cli.cuts:cuts_cmd",
    "train-reference": "dgconvert.cli.gates:train_reference_cmd",
    "calibrate": "dgconvert.cli.calibrate:calibrate_cmd",
    "build": "dgconvert.cli.build:build_cmd",
    "quantize": "dgconvert.cli.quantize:quantize_cmd",
    "predict": "dgconvert.cli.predict:predict_cmd",
    "bench": "dgconvert.cli.bench:bench_cmd",
    "serve": "dgconvert.cli.serve:serve_cmd",
    "info": "dgconvert.cli.info:info_cmd",
    "doctor": "dgconvert.cli.doctor:doctor_cmd",
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(COMMANDS[name].partition(":")[0]) is not None


class LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _available(name)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        mod, _, attr = COMMANDS[cmd_name].partition(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dgconvert")
def main() -> None:
    """Deploy early-exit (decision-gated) networks with real savings at any batch size."""


if __name__ == "__main__":  # pragma: no cover
    main()
