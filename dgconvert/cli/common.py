"""Small helpers shared by the CLI commands (errors, output files, option parsing)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dgconvert.core.errors import DGConvertError
from dgconvert.core.gates import PRUNE_MULTIPLE

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn dgconvert's typed errors into a clean ``Error: …`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DGConvertError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def parse_floats(text: str | None, what: str = "thresholds") -> list[float] | None:
    """``"1.0,1.8,inf"`` -> ``[1.0, 1.8, inf]``."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(
            f"{what} must be comma-separated numbers (use inf to disable a gate), got {text!r}"
        ) from exc


def parse_ints(text: str, what: str = "batch sizes") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise click.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def write_json(path: str | Path, obj: Any) -> None:
    from dgconvert.core.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def backend_option(fn: F) -> F:
    return click.option(
        "--backend",
        type=click.Choice(["auto", "onnxruntime", "onnxruntime-gpu", "tensorrt"]),
        default="auto",
        show_default=True,
        help="Runtime backend; auto = TensorRT engines for this GPU, else onnxruntime-gpu, else CPU.",
    )(fn)


def threads_option(fn: F) -> F:
    return click.option(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)."
    )(fn)


def parse_json_object(text: str | None, hint: str) -> dict[str, Any] | None:
    """A JSON object option (``--arch-kwargs``, ``--normalization``), or None when empty."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f"expected a JSON object such as '{{\"widths\": [8, 16, 16, 32]}}', got {text!r} ({exc})",
            param_hint=hint,
        ) from exc
    if not isinstance(value, dict):
        raise click.BadParameter(
            f"expected a JSON object, got {type(value).__name__}: {text!r}", param_hint=hint
        )
    return value


#: ``--prune-multiple`` of the commands that prune a GaterNet
prune_multiple_option = click.option(
    "--prune-multiple", type=click.IntRange(min=1), default=PRUNE_MULTIPLE, show_default=True,
    help="GaterNet pruning: pruned layers keep a multiple of this many channels (some "
         "always-off filters stay, gated off), so ONNX Runtime keeps its fast blocked layout "
         "(8 with AVX2, 16 with AVX-512); 1 removes every always-off filter.")
