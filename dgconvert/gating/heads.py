"""Gate heads: ``gate(features) -> (score, label, logits)``; a sample exits iff
``score >= threshold``.

- ``dgate`` — decision gate (d-gate paper): global average pool (spatial features) then one
  linear layer, ``d = wᵀx − b``. Score ``max(d)`` (the paper) or ``margin`` (largest minus
  second-largest distance); label ``argmax(d)``.
- ``confidence`` — EENet "pool" exit block: class head + sigmoid confidence head;
  score = confidence, label = argmax of the class head.
- ``softmax`` — linear head, score = max softmax probability (BranchyNet-style baseline).
  ``score="margin"`` uses the gap between the two largest probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dgconvert.core.gates import GATE_KINDS, GATE_TYPES

SCORE_KINDS = {name: kind.scores for name, kind in GATE_KINDS.items()}


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """Global average pool over every axis after the channel axis (``[N, C, ...] -> [N, C]``)."""
    if features.dim() > 2:
        return features.mean(dim=tuple(range(2, features.dim())))
    return features


def _top2_gap(values: torch.Tensor) -> torch.Tensor:
    top2 = torch.topk(values, 2, dim=1).values
    return top2[:, 0] - top2[:, 1]


class GateHead(nn.Module):
    """Common base: records its spec so it can be rebuilt from a checkpoint."""

    gate_type = ""

    def __init__(self, in_features: int, num_classes: int, score: str) -> None:
        super().__init__()
        allowed = SCORE_KINDS[self.gate_type]
        if score not in allowed:
            raise ValueError(
                f"gate {self.gate_type!r} got score={score!r}; expected one of {allowed}"
            )
        if num_classes < 2:
            raise ValueError(f"a gate needs num_classes >= 2, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.score_kind = score

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``{"type", "score", "in_features", "num_classes"}``."""
        return {
            "type": self.gate_type,
            "score": self.score_kind,
            "in_features": self.in_features,
            "num_classes": self.num_classes,
        }


class DGate(GateHead):
    """Decision gate: one linear layer on pooled features, trained with a hinge loss."""

    gate_type = "dgate"

    def __init__(self, in_features: int, num_classes: int, score: str = "max") -> None:
        super().__init__(in_features, num_classes, score)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.linear(pool_features(features))
        score = d.max(dim=1).values if self.score_kind == "max" else _top2_gap(d)
        return score, d.argmax(dim=1), d


class SoftmaxGate(GateHead):
    """Linear head trained with cross-entropy; score = max softmax probability."""

    gate_type = "softmax"

    def __init__(self, in_features: int, num_classes: int, score: str = "max") -> None:
        super().__init__(in_features, num_classes, score)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.linear(pool_features(features))
        p = torch.softmax(logits, dim=1)
        score = p.max(dim=1).values if self.score_kind == "max" else _top2_gap(p)
        return score, logits.argmax(dim=1), logits


class ConfidenceGate(GateHead):
    """EENet "pool" exit block: softmax class branch + sigmoid confidence branch."""

    gate_type = "confidence"

    def __init__(self, in_features: int, num_classes: int, score: str = "sigmoid") -> None:
        super().__init__(in_features, num_classes, score)
        self.classifier = nn.Linear(in_features, num_classes)
        self.confidence = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = pool_features(features)
        logits = self.classifier(z)
        score = torch.sigmoid(self.confidence(z)).squeeze(1)
        return score, logits.argmax(dim=1), logits


_GATES: dict[str, type[GateHead]] = {
    "dgate": DGate,
    "softmax": SoftmaxGate,
    "confidence": ConfidenceGate,
}


def make_gate(spec: str | dict[str, Any], in_features: int, num_classes: int) -> GateHead:
    """Build a gate head from a type name or a spec dict (``{"type": ..., "score": ...}``)."""
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.get("type")
    if kind not in _GATES:
        raise ValueError(f"unknown gate type {kind!r}; expected one of {GATE_TYPES}")
    kwargs = {"score": spec["score"]} if "score" in spec else {}
    return _GATES[kind](in_features, num_classes, **kwargs)


class FinalHead(nn.Module):
    """Wraps the backbone's own classifier output: ``logits -> (score, label, logits)`` with
    score = max softmax probability (informational; the last stage always exits)."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.softmax(logits, dim=1).max(dim=1).values, logits.argmax(dim=1), logits
