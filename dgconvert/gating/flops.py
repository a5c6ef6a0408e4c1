"""Per-sample FLOPs with ``torch.utils.flop_counter`` (matmuls and convolutions)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward call (count on a batch of one to get per-sample FLOPs)."""
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


@torch.no_grad()
def stage_flops(net: Any) -> tuple[list[int], list[int]]:
    """Per-sample FLOPs of each stage body and of each gate head (on its stage's output) of a
    :class:`~dgconvert.gating.network.GatedNetwork`."""
    x = torch.zeros(1, *net.input_shape)
    bodies: list[int] = []
    gates: list[int] = []
    for k, stage in enumerate(net.stages):
        bodies.append(count_flops(stage, x))
        x = stage(x)
        if k < net.num_gates:
            gates.append(count_flops(net.gates[k], x))
    return bodies, gates
