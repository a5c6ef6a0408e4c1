"""``mlp`` gate: pooled features -> one hidden layer of :data:`HIDDEN` units with ReLU ->
class logits, trained with cross-entropy; score = max softmax probability (``max``) or the
gap between the two largest probabilities (``margin``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dgconvert.gating.heads import GateHead, softmax_score

#: Width of the hidden layer.
HIDDEN = 64


class MLPGate(GateHead):
    """A two-layer perceptron on the pooled features, scored by its softmax."""

    gate_type = "mlp"

    def __init__(self, in_features: int, num_classes: int, score: str = "margin", **layout: Any) -> None:
        super().__init__(in_features, num_classes, score, **layout)
        self.hidden = nn.Linear(in_features, HIDDEN)
        self.out = nn.Linear(HIDDEN, num_classes)

    def input_linears(self) -> list[nn.Linear]:
        return [self.hidden]  # only the hidden layer reads the pooled vector

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.out(torch.relu(self.hidden(self.pool(features))))
        return softmax_score(logits, self.score_kind), logits.argmax(dim=1), logits
