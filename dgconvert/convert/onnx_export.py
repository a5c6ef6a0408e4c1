"""Export one torch module to an ONNX file with dynamic batch dimensions."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dgconvert.core.errors import DGConvertError

OPSET = 18


def export_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> None:
    """Export with the torch.export-based exporter; every input's dim 0 is dynamic.

    Each input gets its own batch symbol (``N`` for the first, ``M`` for ``keep``), so the
    graph accepts any ``N`` and any ``M`` (including 0) independently.
    """
    symbols = ["N", "M", "P", "Q"]
    dynamic = tuple({0: torch.export.Dim(symbols[i], min=0)} for i in range(len(input_names)))
    quiet = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise DGConvertError(
            f"ONNX export of {type(module).__name__} failed: {exc}\n{quiet.getvalue()[-2000:]}"
        ) from exc
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
