"""Export one torch module to an ONNX file with dynamic batch dimensions.

Two exporters: the torch.export-based one (``dynamo``, the default) and the
TorchScript-based one (``torchscript``). With ``exporter="auto"`` the second is tried when
the first raises or when its graph fails the caller's ``check`` (e.g. a batch size the
exporter specialised on); the choice is logged. When every exporter raises (or some raise
and the others' graphs fail ``check``), :class:`StageExportError` lists each one's reason;
when every exporter's graph fails ``check`` with
:class:`~dgconvert.core.errors.ExportVerificationError`, their mismatches are raised as one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dgconvert.core.errors import DGConvertError, ExportVerificationError

OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
_SYMBOLS = ["N", "M", "P", "Q"]

logger = logging.getLogger(__name__)


class StageExportError(DGConvertError, RuntimeError):
    """No exporter produced a graph that matches the torch module."""

    def __init__(self, what: str, reasons: dict[str, str], hint: str = "") -> None:
        self.reasons = dict(reasons)
        lines = "\n  ".join(f"{k}: {v}" for k, v in reasons.items())
        super().__init__(
            f"ONNX export of {what} failed with every exporter tried:\n  {lines}\n"
            f"Fix: {hint or 'see below.'} Try exporter='torchscript' or 'dynamo' alone "
            "(CLI --exporter) for the full error; make the module's forward free of "
            "data-dependent Python control flow (branches on tensor values or on the batch "
            "size); cut elsewhere (`dgconvert cuts MODEL` lists the cut points) so that the "
            f"failing module lands in another stage; or use another torch (this is "
            f"{torch.__version__})."
        )


@dataclass(frozen=True)
class ExporterFailure:
    """Why one exporter gave no usable graph: ``graph_differs`` when it produced a graph
    that failed the caller's check (else the export itself raised)."""

    reason: str
    graph_differs: bool


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    # torch.export buries the reason under a generic first line: keep one more
    if len(lines) > 1 and len(head) < 120:
        head += " | " + lines[1].strip()
    return head[:limit]


@contextlib.contextmanager
def _quiet() -> object:
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _dynamo(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
    inputs: Sequence[str], outputs: Sequence[str],
) -> None:  # fmt: skip
    named = tuple({0: torch.export.Dim(_SYMBOLS[i], min=0)} for i in range(len(inputs)))
    auto = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
    last: Exception | None = None
    # named symbols first (N, M in the graph); torch's own inference of the ranges second
    for dynamic in (named, auto):
        try:
            torch.onnx.export(
                module, args, str(path), input_names=list(inputs), output_names=list(outputs),
                dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True,
                external_data=False, verbose=False,
            )  # fmt: skip
            return
        except Exception as exc:  # torch.export raises many types
            last = exc
    assert last is not None
    raise last


def _torchscript(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
    inputs: Sequence[str], outputs: Sequence[str],
) -> None:  # fmt: skip
    axes = {name: {0: _SYMBOLS[i]} for i, name in enumerate(inputs)}
    batch = _SYMBOLS[1] if len(inputs) > 1 else _SYMBOLS[0]
    axes.update({name: {0: batch} for name in outputs})
    torch.onnx.export(
        module, args, str(path), input_names=list(inputs), output_names=list(outputs),
        dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
    )  # fmt: skip


_EXPORT = {"dynamo": _dynamo, "torchscript": _torchscript}


def export_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    exporter: str = "auto",
    check: Callable[[Path], None] | None = None,
    what: str | None = None,
    hint: str = "",
) -> str:
    """Export ``module`` to ``path``; every input's dim 0 is dynamic. Returns the exporter used.

    Each input gets its own batch symbol (``N`` for the first, ``M`` for ``keep``), so the
    graph accepts any ``N`` and any ``M`` (including 0) independently. ``exporter``:
    ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, then torchscript). ``check(path)``
    runs on each exported graph and raises when it is wrong, which counts as a failure of
    that exporter. ``what`` names the module in errors and logs; ``hint`` is added to the fix.
    """
    if exporter not in (*EXPORTERS, "auto"):
        raise ValueError(f"exporter {exporter!r} is unknown; expected auto, dynamo or torchscript")
    what = what or type(module).__name__
    order = list(EXPORTERS) if exporter == "auto" else [exporter]
    failed: dict[str, ExporterFailure] = {}
    mismatches: list[str] = []
    for kind in order:
        try:
            with _quiet():
                _EXPORT[kind](module, args, path, input_names, output_names)
        except Exception as exc:
            failed[kind] = ExporterFailure("export raised " + _first_line(exc), False)
            logger.info("%s: the %s exporter failed: %s", what, kind, failed[kind].reason)
            continue
        if check is not None:
            try:
                check(path)
            except Exception as exc:
                if isinstance(exc, ExportVerificationError):
                    mismatches += [f"{what}, {kind} exporter: {m}" for m in exc.mismatches]
                failed[kind] = ExporterFailure(
                    "the exported graph differs from torch: " + _first_line(exc, 600), True)
                logger.info("%s: the %s graph failed its check: %s", what, kind,
                            failed[kind].reason)
                continue
        if failed:
            logger.warning(
                "%s: exported with the %s exporter (%s)", what, kind,
                "; ".join(f"{k} failed: {f.reason}" for k, f in failed.items()),
            )  # fmt: skip
        return kind
    if mismatches and all(f.graph_differs for f in failed.values()):
        # every exporter produced a graph, none within tolerance: a verification failure
        raise ExportVerificationError(mismatches)
    raise StageExportError(what, {k: f.reason for k, f in failed.items()}, hint)
