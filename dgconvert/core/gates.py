"""Gate kinds (torch-free): one :class:`GateKind` per kind in :data:`GATE_KINDS` holds its
head class (by import path), score kinds, defaults, training objective and fit options, and
validates names and scores (:class:`~dgconvert.core.errors.GateKindError`). The torch heads,
the fitting code and the CLI's choices all derive from it.

The ``exit-head`` kind is a multi-exit model's own exit head (SDN, BranchyNet, MSDNet,
EENets), fused as it is; :func:`exit_head_score` is its score rule on the head's outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgconvert.core.errors import GateKindError

#: How ``gates fit`` trains a gate kind: ``hinge`` (a d-gate's hinge loss, each head alone),
#: ``cross-entropy`` (each head alone) or ``lv2`` (all heads together with EENet's L_v2,
#: after a cross-entropy warm start of their classifier branches).
OBJECTIVES: tuple[str, ...] = ("hinge", "cross-entropy", "lv2")
#: Fit options that only some gate kinds take (``fit_gates`` refuses them for the others):
#: ``hinge`` (which hinge loss), ``joint`` (fine-tune the backbone with the gates).
KIND_OPTIONS: tuple[str, ...] = ("hinge", "joint")


@dataclass(frozen=True)
class GateKind:
    """One gate kind: its torch head, how it scores, how it is trained, where thresholds
    start. Adding a kind is its head module plus one entry in :data:`GATE_KINDS`."""

    name: str
    scores: tuple[str, ...]  # score kinds it supports
    default_score: str  # what ``gates fit`` uses unless told otherwise
    default_threshold: float  # a conservative starting threshold (calibrate to do better)
    loss: str  # what fits it, in words (``gates fit --help``)
    summary: str
    #: ``"module:Class"`` of its :class:`~dgconvert.gating.heads.GateHead`, imported only when
    #: a head is built (this module stays torch-free); None: ``gates fit`` cannot attach it
    head: str | None = None
    objective: str = "cross-entropy"  # one of OBJECTIVES
    l2: float = 1e-4  # default L2 strength on its weights
    options: frozenset[str] = frozenset()  # the KIND_OPTIONS it takes
    #: per score kind starting thresholds where they differ from ``default_threshold``
    score_thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_score not in self.scores or self.objective not in OBJECTIVES \
                or not self.options <= set(KIND_OPTIONS):
            raise GateKindError(
                f"gate kind {self.name!r}: default score {self.default_score!r} of {self.scores}, "
                f"objective {self.objective!r} of {OBJECTIVES}, options {sorted(self.options)} "
                f"of {KIND_OPTIONS}; expected each to be one of its choices"
            )

    @property
    def fittable(self) -> bool:
        """Whether ``gates fit`` can attach and train it."""
        return self.head is not None

    def threshold_for(self, score: str) -> float:
        """The starting threshold of score kind ``score``."""
        return self.score_thresholds.get(score, self.default_threshold)

    def check_score(self, score: str | None) -> str:
        """``score`` (or the default) if this kind supports it, else a :class:`GateKindError`."""
        score = score or self.default_score
        if score not in self.scores:
            raise GateKindError(
                f"score {score!r} does not exist for {self.name} gates; expected one of "
                f"{', '.join(self.scores)}"
            )
        return score

    def head_class(self) -> Any:
        """The torch head class (imports it: needs torch)."""
        if self.head is None:
            raise GateKindError(f"gate kind {self.name!r} has no head that gates fit builds")
        module, _, name = self.head.partition(":")
        return getattr(importlib.import_module(module), name)


GATE_KINDS: dict[str, GateKind] = {
    k.name: k
    for k in (
        GateKind("dgate", ("max", "margin"), "margin", 2.0, "hinge loss",
                 "decision gate: pooled features -> one linear layer, hinge loss (d-gate paper)",
                 head="dgconvert.gating.heads:DGate", objective="hinge",
                 options=frozenset({"hinge"})),
        GateKind("softmax", ("max", "margin"), "margin", 0.99, "cross-entropy",
                 "linear head; score = max softmax probability (BranchyNet-style)",
                 head="dgconvert.gating.heads:SoftmaxGate"),
        GateKind("confidence", ("sigmoid",), "sigmoid", 0.5, "EENet L_v2",
                 "EENet pool exit: class head + sigmoid confidence head",
                 head="dgconvert.gating.heads:ConfidenceGate", objective="lv2",
                 options=frozenset({"joint"})),
        GateKind("mlp", ("max", "margin"), "margin", 0.99, "cross-entropy",
                 "one hidden layer of 64 with ReLU; softmax score", head="dgconvert.gating.mlp_gate:MLPGate"),
        GateKind("exit-head",
                 ("max-softmax", "margin-softmax", "margin-logits", "neg-entropy", "confidence"),
                 "max-softmax", 0.99, "the model's own training",
                 "a multi-exit model's own exit head, fused as it is (SDN, BranchyNet, EENets)",
                 score_thresholds={"margin-logits": 10.0, "neg-entropy": -0.05,
                                   "confidence": 0.5}),
    )
}

#: Gate types ``gates fit`` attaches and trains (``make_gate`` builds them).
GATE_TYPES: tuple[str, ...] = tuple(n for n, k in GATE_KINDS.items() if k.fittable)
#: Every score kind some fittable gate supports, in a stable order.
SCORE_CHOICES: tuple[str, ...] = tuple(dict.fromkeys(s for n in GATE_TYPES
                                                     for s in GATE_KINDS[n].scores))
#: The gate kind of a multi-exit model's own exit heads, and its score rules.
EXIT_HEAD = "exit-head"
EXIT_SCORES: tuple[str, ...] = GATE_KINDS[EXIT_HEAD].scores
DEFAULT_EXIT_SCORE = GATE_KINDS[EXIT_HEAD].default_score
#: The gate ``gates fit`` attaches by default, and the dgate loss it uses.
DEFAULT_GATE = "dgate"
HINGES: tuple[str, ...] = ("ovr", "crammer-singer")
DEFAULT_HINGE = "crammer-singer"


#: How features arrive at a cut: NCHW maps, NHWC maps (Swin, ConvNeXt blocks), token
#: sequences [N, T, D] (ViT), or vectors [N, D].
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens", "vector")
#: How each layout may be pooled to one vector per sample (the first is the default, except
#: for tokens: the class token when the model has one, else the mean). ``gridG`` (NCHW maps):
#: the mean over each cell of a G x G grid, G² values per channel (:data:`GRID_POOLS`).
GRID_POOLS: tuple[str, ...] = ("grid2", "grid4")
POOLS: dict[str, tuple[str, ...]] = {"nchw": ("mean", *GRID_POOLS), "nhwc": ("mean",),
                                     "tokens": ("cls", "mean"), "vector": ("none",)}


def gate_kind(name: str, *, fittable: bool = False) -> GateKind:
    """The :class:`GateKind` called ``name`` (with ``fittable``: one ``gates fit`` attaches);
    a :class:`GateKindError` otherwise."""
    kind = GATE_KINDS.get(name)
    if kind is None or (fittable and not kind.fittable):
        expected = GATE_TYPES if fittable else tuple(GATE_KINDS)
        raise GateKindError(
            f"unknown gate type {name!r}; expected one of {', '.join(expected)}"
            + (f" ({EXIT_HEAD!r} is a multi-exit model's own head: GatedNetwork.from_multi_exit)"
               if name == EXIT_HEAD and fittable else "")
        )
    return kind


def exit_head_score(logits: np.ndarray, confidence: np.ndarray | None, score: str) -> np.ndarray:
    """The ``exit-head`` score rule in numpy (float64): ``logits [N, C]`` and, for
    ``score="confidence"``, the exit's own confidence ``[N]`` or ``[N, 1]``; returns ``[N]``.

    ``max-softmax``: largest softmax probability; ``margin-softmax`` / ``margin-logits``:
    top-1 minus top-2 of the softmax / of the logits; ``neg-entropy``: ``sum p log p``;
    ``confidence``: the confidence as it is.
    """
    GATE_KINDS[EXIT_HEAD].check_score(score)
    z = np.asarray(logits, np.float64)
    if score == "confidence":
        if confidence is None:
            raise ValueError("score='confidence' needs the exit's confidence output; got none")
        return np.asarray(confidence, np.float64).reshape(len(z))
    if score == "margin-logits":
        top2 = np.sort(z, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    if score == "max-softmax":
        return p.max(axis=1)
    if score == "margin-softmax":
        top2 = np.sort(p, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    return (p * (z - z.max(axis=1, keepdims=True) - np.log(e.sum(axis=1, keepdims=True)))).sum(1)


# -- GaterNet filter gates ------------------------------------------------------------------

#: The three kinds of binary filter gates a trained GaterNet shows (its Figure 2): on for
#: every sample, off for every sample, on for some samples and off for others.
FILTER_GATE_KINDS: tuple[str, ...] = ("always_on", "always_off", "input_dependent")
#: How a GaterNet fit's target rate weighs its gates: by the FLOPs that pruning each gate's
#: filter saves, or each filter the same.
RATE_WEIGHTS: tuple[str, ...] = ("flops", "filters")
#: Pruned GaterNet layers keep a multiple of this many channels: ONNX Runtime runs a
#: convolution in its fast blocked (NCHWc) layout only when its channels are a multiple of
#: the SIMD block (8 with AVX2, 16 with AVX-512); an odd count falls back to a slower kernel
#: and reorders.
PRUNE_MULTIPLE = 16


def filter_gate_kinds(on_counts: np.ndarray, samples: int) -> np.ndarray:
    """Each gate's kind (an index into :data:`FILTER_GATE_KINDS`) from how many of
    ``samples`` switched it on: ``samples`` -> always on, ``0`` -> always off, else
    input-dependent."""
    counts = np.asarray(on_counts, np.int64)
    if samples < 1:
        raise ValueError(f"gate kinds need at least one sample, got {samples}")
    if (counts < 0).any() or (counts > samples).any():
        raise ValueError(f"on-counts must lie in 0..{samples}; got {counts.min()}..{counts.max()}")
    return np.where(counts == samples, 0, np.where(counts == 0, 1, 2)).astype(np.int64)


@dataclass
class FilterGateLayer:
    """The gates of one gated layer: how many filters, of which kind, how many were pruned
    (removed from the exported graphs), and the gates' on-rate over the samples."""

    name: str
    filters: int
    always_on: int
    always_off: int
    input_dependent: int
    pruned: int = 0
    on_rate: float = 0.0  # mean share of this layer's gates that are on, over the samples

    @classmethod
    def from_counts(cls, name: str, on_counts: np.ndarray, samples: int,
                    pruned: int = 0) -> FilterGateLayer:
        kinds = filter_gate_kinds(on_counts, samples)
        n = [int((kinds == i).sum()) for i in range(3)]
        rate = float(np.asarray(on_counts, np.float64).sum() / (samples * max(len(kinds), 1)))
        return cls(name, len(kinds), n[0], n[1], n[2], int(pruned), rate)

    def shares(self) -> dict[str, float]:
        """Each kind's share of the layer's filters."""
        f = max(self.filters, 1)
        return {k: getattr(self, k) / f for k in FILTER_GATE_KINDS}

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "filters": self.filters, "always_on": self.always_on,
                "always_off": self.always_off, "input_dependent": self.input_dependent,
                "pruned": self.pruned, "on_rate": self.on_rate}


def format_filter_gates(layers: Sequence[FilterGateLayer]) -> str:
    """A text table of the gate kinds per layer (the paper's Figure 2 as numbers)."""
    rows = ["layer                    filters  always on  always off  input-dep.  on-rate  pruned"]
    tot = [0, 0, 0, 0, 0]
    for lay in layers:
        rows.append(f"{lay.name:<24s} {lay.filters:7d}  {lay.always_on:9d}  {lay.always_off:10d}  "
                    f"{lay.input_dependent:10d}  {100 * lay.on_rate:6.1f}%  {lay.pruned:6d}")
        for j, v in enumerate((lay.filters, lay.always_on, lay.always_off, lay.input_dependent,
                               lay.pruned)):
            tot[j] += v
    if tot[0]:
        rows.append(f"{'all':<24s} {tot[0]:7d}  {tot[1]:9d}  {tot[2]:10d}  {tot[3]:10d}  "
                    f"{'':7s}  {tot[4]:6d}")
        rows.append(f"shares: always on {100 * tot[1] / tot[0]:.1f} %, always off "
                    f"{100 * tot[2] / tot[0]:.1f} %, input-dependent {100 * tot[3] / tot[0]:.1f} %")
    return "\n".join(rows)
