"""Per-sample FLOPs with ``torch.utils.flop_counter`` (matmuls and convolutions)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward call (count on a batch of one to get per-sample FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())
