"""Small pieces every exporter shares: the example batch, tensor specs, the progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dgconvert.core.contract import CONTRACT
from dgconvert.core.manifest import TensorInfo

#: smallest example batch: the batch dims an exporter sees are never 0 or 1 (which it
#: could specialise on), and every stage's keep vector differs in size from its x
MIN_EXAMPLE = 6


def example_batch(example_input: torch.Tensor | np.ndarray | None,
                  shape: Sequence[int]) -> torch.Tensor:
    """The export example: ``example_input`` (default: seeded random inputs) as float32,
    checked against the per-sample ``shape`` and repeated to at least :data:`MIN_EXAMPLE`
    rows."""
    shape = list(shape)
    if example_input is None:
        example_input = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    example = torch.as_tensor(example_input).float()
    if list(example.shape[1:]) != shape:
        raise ValueError(f"example_input has shape {tuple(example.shape)}, expected [N, {shape}]")
    if len(example) < MIN_EXAMPLE:  # dynamic dims must not be specialised on 0/1-sized examples
        reps = (MIN_EXAMPLE + len(example) - 1) // len(example)
        example = example.repeat(reps, *([1] * len(shape)))
    return example


def tensor_specs(names: tuple[str, ...], values: list[torch.Tensor], batch: str) -> list[TensorInfo]:
    """Name, shape (dynamic batch dim named ``batch``; ``keep`` is always ``M``) and dtype."""
    return [
        TensorInfo(n, ["M" if CONTRACT.batch_axis(n) == "M" else batch, *list(v.shape[1:])],
                   str(v.dtype).removeprefix("torch."))
        for n, v in zip(names, values, strict=True)
    ]


def progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="export", unit="step", disable=not enabled, leave=False)
