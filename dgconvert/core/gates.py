"""Gate-type metadata (torch-free): names, score kinds, defaults. The torch heads, the
fitting code and the CLI's choices all derive from :data:`GATE_KINDS`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateKind:
    """One gate type: how it scores, how it is trained, where thresholds start."""

    name: str
    scores: tuple[str, ...]  # score kinds it supports
    default_score: str  # what ``gates fit`` uses unless told otherwise
    default_threshold: float  # a conservative starting threshold (calibrate to do better)
    loss: str  # what fits it
    summary: str


GATE_KINDS: dict[str, GateKind] = {
    k.name: k
    for k in (
        GateKind("dgate", ("max", "margin"), "margin", 2.0, "hinge loss",
                 "decision gate: pooled features -> one linear layer, hinge loss (d-gate paper)"),
        GateKind("softmax", ("max", "margin"), "margin", 0.99, "cross-entropy",
                 "linear head; score = max softmax probability (BranchyNet-style)"),
        GateKind("confidence", ("sigmoid",), "sigmoid", 0.5, "EENet L_v2",
                 "EENet pool exit: class head + sigmoid confidence head"),
    )
}

GATE_TYPES: tuple[str, ...] = tuple(GATE_KINDS)
#: Every score kind some gate supports, in a stable order.
SCORE_CHOICES: tuple[str, ...] = tuple(dict.fromkeys(s for k in GATE_KINDS.values()
                                                     for s in k.scores))
#: The gate ``gates fit`` attaches by default, and the dgate loss it uses.
DEFAULT_GATE = "dgate"
HINGES: tuple[str, ...] = ("ovr", "crammer-singer")
DEFAULT_HINGE = "crammer-singer"


def gate_kind(name: str) -> GateKind:
    """The :class:`GateKind` called ``name``; a clear ``ValueError`` otherwise."""
    try:
        return GATE_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown gate type {name!r}; expected one of {GATE_TYPES}") from None


def check_score(gate: str, score: str | None) -> str:
    """``score`` (or the gate's default) if ``gate`` supports it; else a ``ValueError``."""
    kind = gate_kind(gate)
    score = score or kind.default_score
    if score not in kind.scores:
        raise ValueError(f"gate {gate!r} got score={score!r}; expected one of {kind.scores}")
    return score
