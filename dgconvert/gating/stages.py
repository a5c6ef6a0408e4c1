"""Torch modules whose inputs and outputs are, in order, those of the stage-graph contract
(:data:`dgconvert.core.contract.CONTRACT`): stage 0 maps the images to
``(features, score, label, gate_logits)``; stage k >= 1 gathers its input rows by ``keep``
first; the last stage returns ``(logits, label, score)``; a one-stage bundle's only stage
(:class:`SingleStage`) maps the images to ``(logits, label, score)``."""

from __future__ import annotations

import torch
from torch import nn

from dgconvert.gating.heads import FinalHead
from dgconvert.gating.network import GatedNetwork


class FirstStage(nn.Module):
    def __init__(self, body: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.body, self.gate = body, gate

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.body(images)
        score, label, logits = self.gate(f)
        return f, score, label, logits


class NextStage(nn.Module):
    def __init__(self, body: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.body, self.gate = body, gate

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.body(x.index_select(0, keep))
        score, label, logits = self.gate(f)
        return f, score, label, logits


class LastStage(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, FinalHead()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.body(x.index_select(0, keep))
        score, label, _ = self.head(logits)
        return logits, label, score


def stage_modules(net: GatedNetwork) -> list[nn.Module]:
    """One contract-shaped module per stage of ``net``."""
    k = net.num_gates
    mods: list[nn.Module] = [FirstStage(net.stages[0], net.gates[0])]
    mods += [NextStage(net.stages[i], net.gates[i]) for i in range(1, k)]
    mods.append(LastStage(net.stages[k]))
    # eval: a wrapper left in training mode would have the TorchScript exporter, which puts
    # back the mode it found, switch every layer inside to training mode after export
    return [m.eval() for m in mods]


def describe_stage(net: GatedNetwork, k: int) -> str:
    """``stage k (backbone from after 'a' to 'b'; modules …)`` for errors and logs."""
    cuts = net.cuts
    last = net.num_gates
    start = "the input" if k == 0 else f"after {cuts[k - 1]!r}" if cuts else f"stage {k - 1}"
    end = "the logits" if k == last else f"{cuts[k]!r}" if cuts else "its gate"
    body = net.stages[k]
    mods: list[str] = []
    graph = getattr(body, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and str(node.target).split(".")[0] not in mods:
                mods.append(str(node.target))
    shown = ", ".join(mods[:8]) + (f", … ({len(mods) - 8} more)" if len(mods) > 8 else "")
    spec = net.gates[k].spec() if k < last else {}
    gate = f" + {spec['type']} gate ({spec.get('layout', 'own head')})" if k < last else ""
    return f"stage {k} (backbone from {start} to {end}{gate}; modules: {shown or type(body).__name__})"


class SingleStage(nn.Module):
    """The one stage of a bundle without exits: ``images -> (logits, label, score)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.head = net, FinalHead()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.net(images)
        score, label, _ = self.head(logits)
        return logits, label, score
