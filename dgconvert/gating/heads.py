"""Gate heads: ``gate(features) -> (score, label, logits)``; a sample exits iff
``score >= threshold``.

Every head first pools its stage's features to one vector per sample, by their layout
(:data:`LAYOUTS`): ``nchw`` maps ``[N, C, H, W]`` (CNNs) and ``nhwc`` maps ``[N, H, W, C]``
(Swin, some ConvNeXt blocks) are averaged over their spatial axes; ``tokens`` ``[N, T, D]``
(ViT) take the class token (``pool="cls"``, token 0) or the mean of the tokens
(``pool="mean"``); ``vector`` ``[N, C]`` is used as is. ``nchw`` maps may instead keep a
coarse spatial layout (``pool="grid2"`` / ``"grid4"``): the mean over each cell of a G x G
grid (cells of ``ceil(H / G)`` rows and columns, the last ones smaller), flattened channel
by channel, so an early gate sees where a pattern is and not only whether it is there. The pooled vector feeds the same
linear heads whatever the layout; an input that is already pooled (2-D) passes through, so
gate fitting can train the heads on cached pooled vectors.

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

from dgconvert.core.gates import GRID_POOLS, LAYOUTS, POOLS, gate_kind


def grid_cell(size: int, pool: str) -> int:
    """Side of a ``gridG`` pool's cells along an axis of ``size``: ``ceil(size / G)``."""
    return -(-int(size) // int(pool.removeprefix("grid")))


def pool_features(features: torch.Tensor, layout: str = "nchw", pool: str = "mean") -> torch.Tensor:
    """One vector per sample: ``[N, C, ...]`` (nchw) / ``[N, ..., C]`` (nhwc) averaged over
    the spatial axes (``gridG``: over each cell of a G x G grid of a ``[N, C, H, W]`` map),
    ``[N, T, D]`` (tokens) its token 0 (``cls``) or mean over T; 2-D input (already pooled)
    is returned as is."""
    if features.dim() <= 2:
        return features
    if pool in GRID_POOLS:
        h, w = int(features.shape[2]), int(features.shape[3])
        kernel = (grid_cell(h, pool), grid_cell(w, pool))
        partial = h % kernel[0] != 0 or w % kernel[1] != 0  # ceil_mode only where it matters
        cells = torch.nn.functional.avg_pool2d(features, kernel, kernel, ceil_mode=partial)
        return cells.flatten(1)
    if layout == "nhwc":
        return features.mean(dim=tuple(range(1, features.dim() - 1)))
    if layout == "tokens":
        return features[:, 0] if pool == "cls" else features.mean(dim=1)
    return features.mean(dim=tuple(range(2, features.dim())))


def feature_size(shape: tuple[int, ...] | list[int], layout: str, pool: str | None = None) -> int:
    """Length of the pooled vector of features of ``shape`` (batch dim included)."""
    if pool in GRID_POOLS:
        h, w = int(shape[2]), int(shape[3])
        return int(shape[1]) * -(-h // grid_cell(h, pool)) * -(-w // grid_cell(w, pool))
    return int(shape[-1] if layout in ("nhwc", "tokens") else shape[1])


def check_layout(layout: str, pool: str | None, shape: tuple[int, ...] | list[int] | None = None) -> str:
    """Validate ``layout``/``pool`` (and ``shape`` against the layout); return the pool."""
    if layout not in LAYOUTS:
        raise ValueError(f"feature layout {layout!r} is unknown; expected one of {LAYOUTS}")
    pool = pool or POOLS[layout][0]
    if pool not in POOLS[layout]:
        raise ValueError(
            f"pool {pool!r} does not exist for {layout} features; expected one of {POOLS[layout]}"
        )
    if shape is not None:
        rank = {"nchw": (3, 4, 5), "nhwc": (4,), "tokens": (3,), "vector": (2,)}[layout]
        if pool in GRID_POOLS and len(shape) != 4:
            raise ValueError(
                f"pool {pool!r} averages cells of 2-D maps [N, C, H, W]; these features have "
                f"shape {list(shape)}. Fix: pool 'mean' for this cut."
            )
        if len(shape) not in rank:
            raise ValueError(
                f"features of shape {list(shape)} do not fit layout {layout!r} (expected "
                f"{' or '.join(f'{r}-D' for r in rank)} tensors). Fix: pass the layout that "
                "matches the cut's output: nchw [N,C,H,W], nhwc [N,H,W,C], tokens [N,T,D], "
                "vector [N,C]."
            )
    return pool


def top2_gap(values: torch.Tensor) -> torch.Tensor:
    """Per row, the largest value minus the second largest (``[N, C] -> [N]``)."""
    top2 = torch.topk(values, 2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def softmax_score(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Score of a softmax-scored head: the largest probability (``max``) or the gap between
    the two largest (``margin``)."""
    p = torch.softmax(logits, dim=1)
    return p.max(dim=1).values if score == "max" else top2_gap(p)


class GateHead(nn.Module):
    """Common base: records its spec so it can be rebuilt from a checkpoint."""

    gate_type = ""

    def __init__(
        self, in_features: int, num_classes: int, score: str, layout: str = "nchw",
        pool: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.layout = layout
        self.pool_kind = check_layout(layout, pool)
        gate_kind(self.gate_type).check_score(score)
        if num_classes < 2:
            raise ValueError(f"a gate needs num_classes >= 2, got {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.score_kind = score

    def input_linears(self) -> list[nn.Linear]:
        """The linear layers that read the pooled vector (standardization folds into them)."""
        return [m for m in self.modules() if isinstance(m, nn.Linear)]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The pooled vector ``[N, in_features]`` the linear layers see."""
        # getattr: whole pickles of heads from before layouts existed pool as NCHW
        return pool_features(
            features, getattr(self, "layout", "nchw"), getattr(self, "pool_kind", "mean")
        )

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``{"type", "score", "layout", "pool", "in_features",
        "num_classes"}``."""
        return {
            "type": self.gate_type,
            "score": self.score_kind,
            "layout": getattr(self, "layout", "nchw"),
            "pool": getattr(self, "pool_kind", "mean"),
            "in_features": self.in_features,
            "num_classes": self.num_classes,
        }


class DGate(GateHead):
    """Decision gate: one linear layer on pooled features, trained with a hinge loss."""

    gate_type = "dgate"

    def __init__(self, in_features: int, num_classes: int, score: str = "max", **layout: Any) -> None:
        super().__init__(in_features, num_classes, score, **layout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.linear(self.pool(features))
        score = d.max(dim=1).values if self.score_kind == "max" else top2_gap(d)
        return score, d.argmax(dim=1), d


class SoftmaxGate(GateHead):
    """Linear head trained with cross-entropy; score = max softmax probability."""

    gate_type = "softmax"

    def __init__(self, in_features: int, num_classes: int, score: str = "max", **layout: Any) -> None:
        super().__init__(in_features, num_classes, score, **layout)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.linear(self.pool(features))
        return softmax_score(logits, self.score_kind), logits.argmax(dim=1), logits


class ConfidenceGate(GateHead):
    """EENet "pool" exit block: softmax class branch + sigmoid confidence branch."""

    gate_type = "confidence"

    def __init__(self, in_features: int, num_classes: int, score: str = "sigmoid", **layout: Any) -> None:
        super().__init__(in_features, num_classes, score, **layout)
        self.classifier = nn.Linear(in_features, num_classes)
        self.confidence = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.pool(features)
        logits = self.classifier(z)
        score = torch.sigmoid(self.confidence(z)).squeeze(1)
        return score, logits.argmax(dim=1), logits


def make_gate(spec: str | dict[str, Any], in_features: int, num_classes: int) -> GateHead:
    """Build a gate head from a type name or a spec dict (``{"type", "score", "layout",
    "pool"}``, all but the type optional); the type's class comes from its
    :class:`~dgconvert.core.gates.GateKind`."""
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    kind = gate_kind(spec.get("type"), fittable=True)  # type: ignore[arg-type]
    kwargs = {k: spec[k] for k in ("score", "layout", "pool") if spec.get(k) is not None}
    head: GateHead = kind.head_class()(in_features, num_classes, **kwargs)
    return head


class FinalHead(nn.Module):
    """Wraps the backbone's own classifier output: ``logits -> (score, label, logits)`` with
    score = max softmax probability (informational; the last stage always exits)."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.softmax(logits, dim=1).max(dim=1).values, logits.argmax(dim=1), logits
