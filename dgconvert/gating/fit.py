"""Fit gate heads on a frozen backbone (d-gate paper, sec. 2.2 and "Training Setup").

One pass of the frozen backbone (eval mode) over the data caches every gate's input —
the globally pooled features at each cut — and the final logits. Each gate is then
trained on those cached vectors, which takes seconds:

- ``dgate``: one linear layer, ``d = wᵀx − b``, trained with a hinge loss and an L2 term by
  mini-batch sub-gradient descent, each gate independently on all training data (paper eq.
  1–3). ``hinge="ovr"`` is the paper's one-vs-all hinge; the default, ``"crammer-singer"``,
  the multi-class hinge (scored by its ``margin``: ≥ 1 means outside the margin).
- ``softmax``: the same linear layer trained with cross-entropy (the paper's baseline).
- ``confidence``: EENet ``pool`` exit blocks trained together with the cost-aware loss
  ``L_v2`` (costs are FLOP fractions); ``joint=True`` also fine-tunes the backbone (no
  feature cache then: the backbone runs every step).

``standardize=True`` trains on standardized features and folds the standardization into
the linear layers afterwards (``W' = W/σ``, ``b' = b − W'μ``): the gate heads — and so the
exported graphs — are unchanged. The backbone's own classifier stays the final exit.

A held-out share of the data (``holdout``) gives each gate's coverage/accuracy curve (share
of samples with ``score ≥ t`` and the gate's accuracy on them) and its initial threshold:
the lowest ``t`` at which exiting costs no held-out accuracy — on the samples with
``score ≥ t`` the gate is right at least as often as the final classifier (``inf``, gate
disabled, if no ``t`` qualifies); ``dgconvert calibrate`` then trades accuracy for speed.
All of it is returned in a :class:`FitResult` and recorded in ``net.fit_record``, which
:func:`dgconvert.save` keeps. :data:`PAPER_DGATE` is the paper's exact setting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dgconvert.core.errors import DGConvertError
from dgconvert.core.exits import ExitRule
from dgconvert.core.gates import DEFAULT_GATE, DEFAULT_HINGE, HINGES, gate_kind
from dgconvert.gating.heads import GateHead
from dgconvert.gating.losses import crammer_singer_hinge, eenet_lv2, ovr_hinge
from dgconvert.gating.network import GatedNetwork
from dgconvert.gating.sgd import progress_bar, sgd
from dgconvert.gating.threads import torch_threads

if TYPE_CHECKING:
    from dgconvert.data import Dataset

__all__ = [
    "DEFAULT_GATE",
    "DEFAULT_HINGE",
    "HINGES",
    "PAPER_DGATE",
    "BackboneFitConfig",
    "FitConfig",
    "FitError",
    "FitResult",
    "Features",
    "GateReport",
    "coverage_curve",
    "exit_costs",
    "extract_features",
    "fit_gates",
    "gate_outputs",
    "gate_reports",
    "holdout_split",
    "check_backbone_accuracy",
    "initial_threshold",
    "resolve_backbone",
    "resolve_data",
    "train_heads",
]

#: Defaults of :func:`fit_gates` and ``dgconvert gates fit`` (per gate kind: its
#: :class:`~dgconvert.core.gates.GateKind`): a d-gate trained with the Crammer–Singer hinge on
#: standardized features, scored by the margin between its two largest distances (why:
#: benchmarks/results/gate_comparison.md).
#: The d-gate paper's exact formulation, as keyword arguments of :func:`fit_gates`.
PAPER_DGATE: dict[str, Any] = {"gate": "dgate", "score": "max", "hinge": "ovr", "standardize": False}

_DEFAULT_LR = 0.2
_JOINT_LR = 1e-3


class FitError(DGConvertError, ValueError):
    """Gate fitting got options or data it cannot use."""


class NearChanceError(FitError):
    """The backbone itself scores near chance on the data it is given."""


def check_backbone_accuracy(
    logits: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    *,
    normalization: dict[str, Any] | None,
    source: str = "the data",
    flag: str = "--normalization",
    override: str = "--allow-near-chance",
) -> float:
    """The backbone's top-1 accuracy on ``labels``; raise :class:`NearChanceError` when it is
    near chance: below ``min(2 * chance, chance + (1 - chance) / 4)``, chance being the
    majority-class share of ``labels`` (so 20 % for 10 balanced classes)."""
    pred = np.asarray(logits).argmax(1)
    y = np.asarray(labels)
    if len(y) == 0:
        return float("nan")
    acc = float((pred == y).mean())
    chance = float(np.bincount(y).max() / len(y))
    limit = min(2 * chance, chance + (1 - chance) / 4)
    if acc < limit:
        norm = json_text(normalization) if normalization else "none (images scaled as stored)"
        raise NearChanceError(
            f"the backbone itself scores {100 * acc:.1f} % top-1 on {source} ({len(y)} samples); "
            f"chance is {100 * chance:.1f} % (the largest class), so gates fitted on it would "
            f"be worthless. Input normalization used: {norm}. Likely cause: the inputs are not "
            f"prepared as in the backbone's training (normalization, channel order, image "
            f"size) or the labels are in another class order. Fix: pass {flag} with the "
            f"training's values, e.g. {flag} '{{\"scale\": 255, \"mean\": [0.286], "
            f"\"std\": [0.353]}}', or check --arch/--arch-kwargs; if the backbone is meant "
            f"to be this weak, pass {override}."
        )
    return acc


def json_text(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(", ", ": "))


@dataclass
class Features:
    """Cached gate inputs: pooled features per cut (``K x [N, F_k]``) and final logits."""

    pooled: list[torch.Tensor]
    logits: torch.Tensor

    def subset(self, idx: torch.Tensor) -> Features:
        return Features([p[idx] for p in self.pooled], self.logits[idx])


@dataclass
class GateReport:
    """One gate's fit: options, final training loss, held-out curve and threshold."""

    index: int
    cut: str
    type: str
    score: str
    in_features: int
    train_loss: float
    threshold: float
    holdout_accuracy: float | None = None  # the gate's own top-1 accuracy on held-out data
    exit_rate: float | None = None  # share of held-out samples with score >= threshold
    exit_accuracy: float | None = None  # gate accuracy on those samples
    curve: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    """What :func:`fit_gates` returns: the gated network and per-gate reports."""

    net: GatedNetwork
    gates: list[GateReport]
    final_accuracy: float | None  # the backbone classifier on the held-out data
    exit_costs: list[float]  # per-sample FLOPs of exiting at gate k (k = K: final)
    options: dict[str, Any]
    seconds: float = 0.0

    @property
    def thresholds(self) -> list[float]:
        return [g.threshold for g in self.gates]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able record (what ``net.fit_record`` holds)."""
        return {
            "options": self.options,
            "final_accuracy": self.final_accuracy,
            "exit_costs": self.exit_costs,
            "seconds": round(self.seconds, 2),
            "gates": [asdict(g) for g in self.gates],
        }

    def table(self) -> str:
        """A small text table: per gate, accuracy at a few coverages and the threshold."""
        covs = (0.1, 0.25, 0.5, 0.75, 1.0)
        lines = []
        if self.final_accuracy is not None:
            n = self.options.get("holdout_samples")
            lines.append(f"held-out samples: {n}; final classifier accuracy {100 * self.final_accuracy:.2f} %")
        full = self.exit_costs[-1] if self.exit_costs else 0
        for g in self.gates:
            cost = f"{100 * self.exit_costs[g.index] / full:.0f} % of the FLOPs" if full else ""
            head = f"gate {g.index} after {g.cut} ({g.type}, score {g.score}; {cost})"
            if g.holdout_accuracy is None:
                lines.append(f"{head}: threshold {g.threshold:.4g} (no held-out data)")
                continue
            lines.append(f"{head}: top-1 {100 * g.holdout_accuracy:.2f} %")
            pts = [_at_coverage(g.curve, c) for c in covs]
            lines.append("  coverage " + "".join(f"{100 * p['coverage']:>9.1f}%" for p in pts))
            lines.append("  accuracy " + "".join(f"{100 * p['accuracy']:>9.2f}%" for p in pts))
            lines.append("  score >= " + "".join(f"{p['threshold']:>10.3g}" for p in pts))
            if math.isinf(g.threshold):
                lines.append("  threshold inf: exiting here always costs accuracy (gate off)")
            else:
                lines.append(
                    f"  threshold {g.threshold:.4g}: exits {100 * (g.exit_rate or 0):.1f} % "
                    f"at {100 * (g.exit_accuracy or 0):.2f} % accuracy"
                )
        return "\n".join(lines)


def _at_coverage(curve: list[dict[str, float]], cov: float) -> dict[str, float]:
    return min(curve, key=lambda p: abs(p["coverage"] - cov))


# --------------------------------------------------------------------------- building blocks


@torch.no_grad()
def extract_features(
    net: GatedNetwork,
    images: np.ndarray,
    normalization: dict[str, Any] | None,
    batch_size: int = 512,
    progress: bool | str = False,
) -> Features:
    """Run the (eval-mode) stages once over ``images`` and cache the gate inputs."""
    from dgconvert.core.preprocess import normalize

    was = [s.training for s in net.stages]
    for s in net.stages:
        s.eval()
    pooled: list[list[torch.Tensor]] = [[] for _ in range(net.num_gates)]
    logits = []
    bar = progress_bar(len(images), progress, "features", "img")
    try:
        for start in range(0, len(images), batch_size):
            xb = images[start : start + batch_size]
            x = torch.from_numpy(normalize(xb, normalization) if xb.dtype == np.uint8 else xb)
            for k in range(net.num_gates):
                x = net.stages[k](x)
                pooled[k].append(net.gates[k].pool(x).float())
            logits.append(net.stages[-1](x).float())
            bar.update(len(xb))
    finally:
        bar.close()
        for s, w in zip(net.stages, was, strict=True):
            s.train(w)
    return Features([torch.cat(p) for p in pooled], torch.cat(logits))


@torch.no_grad()
def gate_outputs(heads: Sequence[nn.Module], pooled: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels ``[N, K]`` of the heads on cached pooled features."""
    scores, labels = [], []
    for head, x in zip(heads, pooled, strict=True):
        head.eval()
        s, lab, _ = head(x)
        scores.append(s.numpy())
        labels.append(lab.numpy())
    return np.stack(scores, 1).astype(np.float32), np.stack(labels, 1).astype(np.int64)


def exit_costs(net: GatedNetwork) -> list[float]:
    """Cumulative per-sample FLOPs of exiting at gate k (gates included); last: the final stage."""
    from dgconvert.gating.flops import stage_flops

    bodies, gates = stage_flops(net)
    total, costs = 0.0, []
    for body, gate in zip(bodies, [*gates, 0], strict=True):
        total += body + gate
        costs.append(total)
    return costs


def coverage_curve(scores: np.ndarray, correct: np.ndarray, points: int = 20) -> list[dict[str, float]]:
    """``points`` rows ``{coverage, threshold, accuracy}``: the share of samples with
    ``score >= threshold`` and the accuracy on them, at coverages ``1/points … 1``."""
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], np.cumsum(correct[order])
    n, rows = len(s), []
    for q in np.linspace(1.0 / points, 1.0, points):
        t = float(s[max(math.ceil(q * n), 1) - 1])
        m = int(np.searchsorted(-s, -t, side="right"))  # ties included: all scores >= t
        rows.append({"coverage": m / n, "threshold": t, "accuracy": float(c[m - 1] / m)})
    return rows


def initial_threshold(scores: np.ndarray, gate_correct: np.ndarray, final_correct: np.ndarray) -> float:
    """The lowest threshold at which exiting costs no accuracy on these samples: among the
    samples with ``score >= t`` the gate is right at least as often as the final classifier.
    ``inf`` (gate disabled) if no threshold qualifies."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order].astype(np.float64)
    gain = np.cumsum(gate_correct[order].astype(np.int64) - final_correct[order].astype(np.int64))
    last = np.r_[s[1:] != s[:-1], True]  # only cut between distinct scores
    ok = np.flatnonzero(last & (gain >= 0))
    return float(s[ok[-1]]) if ok.size else float("inf")


def _linears(head: nn.Module) -> list[nn.Linear]:
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def _fold_standardization(head: GateHead, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make a head trained on ``(x − mean) / std`` take raw ``x``: ``W' = W/σ``, ``b' = b − W'μ``."""
    for lin in head.input_linears():
        lin.weight.div_(std)
        lin.bias.sub_(lin.weight @ mean)


def _data_loss(head: GateHead, x: torch.Tensor, y: torch.Tensor, hinge: str) -> torch.Tensor:
    _, _, logits = head(x)
    if gate_kind(head.gate_type).objective != "hinge":  # cross-entropy; L_v2's warm start
        return nn.functional.cross_entropy(logits, y)
    return ovr_hinge(logits, y) if hinge == "ovr" else crammer_singer_hinge(logits, y)


def train_heads(
    heads: Sequence[GateHead],
    features: Features,
    y: torch.Tensor,
    *,
    hinge: str = "ovr",
    l2: float = 1e-4,
    standardize: bool = True,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = _DEFAULT_LR,
    costs: Sequence[float] | None = None,
    cost_weight: float = 1.0,
    seed: int = 0,
    progress: bool | str = False,
) -> list[float]:
    """Train gate heads in place on cached features; return each head's final-epoch loss.

    ``dgate``/``softmax`` heads are trained one after another, independently;
    ``confidence`` heads together with ``L_v2`` (``costs``: K+1 cumulative cost fractions),
    after a cross-entropy warm start of their classifier branches.
    """
    kinds = {h.gate_type for h in heads}
    if len(kinds) != 1:
        raise FitError(f"got gate types {sorted(kinds)}; expected one type for all gates")
    kind = kinds.pop()
    stats = []
    for x in features.pooled:
        mean = x.mean(0) if standardize else torch.zeros(x.shape[1])
        std = x.std(0).clamp_min(1e-6) if standardize else torch.ones(x.shape[1])
        stats.append((mean, std))
    xs = [(x - m) / s for x, (m, s) in zip(features.pooled, stats, strict=True)]
    n = len(y)
    steps = math.ceil(n / batch_size)
    with torch_threads(1):  # tiny matmuls: more threads only add synchronisation
        if gate_kind(kind).objective == "lv2":
            if costs is None:
                raise FitError("confidence gates need costs (K+1 cumulative cost fractions)")
            bar = progress_bar((len(heads) + 1) * epochs * steps, progress, "fit confidence gates", "step")
            # Warm start: each classifier branch is first fitted with cross-entropy. With a
            # frozen, accurate final classifier, L_v2 alone drives h -> 0 at early exits and
            # then starves their classifier branches (their gradient scales with h).
            for head, x in zip(heads, xs, strict=True):
                warm = lambda i, h=head, x=x: _data_loss(h, x[i], y[i], hinge)  # noqa: E731
                sgd(list(head.classifier.parameters()), warm, n, epochs, batch_size, lr, l2,
                     [head.classifier], seed, bar)  # fmt: skip
            final_p = torch.softmax(features.logits, 1)
            last = sgd(
                [p for h in heads for p in h.parameters()],
                lambda i: _lv2_step(heads, [x[i] for x in xs], final_p[i], y[i], costs, cost_weight),
                n, epochs, batch_size, lr, l2, [m for h in heads for m in _linears(h)], seed, bar,
            )  # fmt: skip
            bar.close()
            losses = [last] * len(heads)
        else:
            losses = []
            bar = progress_bar(len(heads) * epochs * steps, progress, f"fit {kind} gates", "step")
            for head, x in zip(heads, xs, strict=True):
                loss_fn = lambda i, h=head, x=x: _data_loss(h, x[i], y[i], hinge)  # noqa: E731
                losses.append(sgd(list(head.parameters()), loss_fn, n, epochs, batch_size, lr, l2,
                                   _linears(head), seed, bar))  # fmt: skip
            bar.close()
    for head, (mean, std) in zip(heads, stats, strict=True):
        head.eval()
        if standardize:
            _fold_standardization(head, mean, std)
    return losses


def _lv2_step(
    heads: Sequence[GateHead],
    xs: Sequence[torch.Tensor],
    final_p: torch.Tensor,
    y: torch.Tensor,
    costs: Sequence[float],
    cost_weight: float,
) -> torch.Tensor:
    probs, confs = [], []
    for head, x in zip(heads, xs, strict=True):
        h, _, logits = head(x)
        probs.append(torch.softmax(logits, 1))
        confs.append(h)
    return eenet_lv2([*probs, final_p], confs, costs, y, cost_weight)


# --------------------------------------------------------------------------- the entry point


@dataclass(kw_only=True)
class BackboneFitConfig:
    """What every fit that starts from a trained backbone takes: the ``backbone`` and how to
    read it (``arch``, ``trust_pickle``; ``input_shape``, ``normalization``, ``classes``
    when the checkpoint does not record them), the labelled ``data`` and the share of it
    held out (``holdout``), ``seed``, ``progress`` bars, and ``check_accuracy`` (stop when
    the backbone scores near chance on ``data``)."""

    backbone: nn.Module | str | Path
    data: str | Dataset
    arch: str | dict[str, Any] | None = None
    trust_pickle: bool = False
    input_shape: Sequence[int] | None = None
    normalization: dict[str, Any] | None = None
    classes: Sequence[str] | None = None
    holdout: float = 0.1
    seed: int = 0
    progress: bool = True
    check_accuracy: bool = True


@dataclass(kw_only=True)
class FitConfig(BackboneFitConfig):
    """Options of :func:`fit_gates` (the ``cut-backbone`` family's ``fit``).

    ``backbone``: a module (pass ``arch`` — ``"module:callable"`` or ``{"factory", "kwargs"}``
    — so :func:`dgconvert.save` can write it weights-only) or a checkpoint path (read with
    :func:`dgconvert.load_backbone`; ``arch`` for plain state_dicts, ``trust_pickle`` for
    whole pickles). ``data``: a ``--data`` spec or a :class:`~dgconvert.data.Dataset` with
    labels (uint8 images are normalized with the backbone's normalization).

    ``score`` defaults to the gate kind's (:data:`~dgconvert.core.gates.GATE_KINDS`); ``hinge`` (``"ovr"``, ``"crammer-singer"``),
    ``l2`` and ``standardize`` shape the training (``PAPER_DGATE`` is the paper's exact
    setting). ``joint`` (confidence gates only) then fine-tunes backbone and exits together
    with ``L_v2`` for ``joint_epochs`` epochs at learning rate ``joint_lr``. Otherwise the
    backbone is frozen (``requires_grad`` off, eval mode) and shared with the returned
    network. ``holdout`` is the share of ``data`` kept out of training for the
    coverage/accuracy report and the initial thresholds.

    ``cuts`` may be an int K (K automatic cut points at about equal FLOPs shares, or at
    ``shares``); ``layout`` / ``token_pool`` as in :meth:`GatedNetwork.from_backbone`;
    ``pool`` how every gate pools NCHW maps (``mean``, ``grid2``, ``grid4``: ``POOLS``).
    ``check_accuracy``: stop with :class:`NearChanceError` when the backbone's own accuracy
    on ``data`` is near chance (usually a wrong input normalization).
    """

    cuts: Sequence[str] | int = ("layer1", "layer2", "layer3")
    gate: str = DEFAULT_GATE
    score: str | None = None
    hinge: str = DEFAULT_HINGE
    l2: float | None = None
    standardize: bool = True
    epochs: int = 20
    batch_size: int = 256
    lr: float | None = None
    joint: bool = False
    joint_epochs: int = 1
    joint_lr: float = _JOINT_LR
    cost_weight: float = 1.0
    feature_batch_size: int = 512
    shares: Sequence[float] | None = None
    layout: str | None = None
    token_pool: str | None = None
    pool: str | None = None


def fit_gates(
    backbone: nn.Module | str | Path | FitConfig,
    data: str | Dataset | None = None,
    cuts: Sequence[str] | int = ("layer1", "layer2", "layer3"),
    gate: str = DEFAULT_GATE,
    **options: Any,
) -> FitResult:
    """Cut ``backbone`` at ``cuts``, attach a ``gate`` head after each and fit the heads.

    Called with a :class:`FitConfig` (``fit_gates(FitConfig(...))``), or with its fields as
    arguments (``fit_gates(backbone, data, cuts, gate, epochs=..., ...)``).
    """
    if isinstance(backbone, FitConfig):
        if data is not None or options:
            raise TypeError("fit_gates(FitConfig(...)) takes no other arguments")
        cfg = backbone
    else:
        if data is None:
            raise TypeError("fit_gates needs data (a --data spec or a Dataset)")
        cfg = FitConfig(backbone=backbone, data=data, cuts=cuts, gate=gate, **options)
    return _fit(cfg)


@dataclass
class _Prepared:
    """A fit's inputs resolved: the gated network built, the data and its labels."""

    net: GatedNetwork
    model: nn.Module
    ds: Dataset
    y: np.ndarray
    normalization: dict[str, Any] | None


def _prepare(cfg: FitConfig, score: str) -> _Prepared:
    """Load the backbone and the data, check they fit each other, build the network."""
    model, arch_spec, info = resolve_backbone(cfg.backbone, cfg.arch, cfg.trust_pickle)
    spec_in = info.get("input") or {}
    input_shape = list(cfg.input_shape or spec_in.get("shape") or [])
    normalization = (cfg.normalization if cfg.normalization is not None
                     else spec_in.get("normalization"))
    ds = resolve_data(cfg.data)
    if not input_shape:
        input_shape = list(ds.sample_shape)
    if list(ds.sample_shape) != [int(s) for s in input_shape]:
        raise FitError(
            f"{ds.source or 'the data'} has samples of shape {list(ds.sample_shape)}; the "
            f"backbone expects {list(input_shape)}. Fix: pass data of the backbone's input "
            "shape (or input_shape=... if the checkpoint does not record it)."
        )
    y_all = ds.require_labels("gate fitting")
    classes = list(cfg.classes or info.get("classes") or ds.classes or [])
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        net = GatedNetwork.from_backbone(
            model, cfg.cuts if isinstance(cfg.cuts, int) else list(cfg.cuts),
            gate={"type": cfg.gate, "score": score, "pool": cfg.pool}, input_shape=input_shape,
            normalization=normalization, classes=classes or None, arch=arch_spec,
            shares=cfg.shares, layout=cfg.layout, token_pool=cfg.token_pool,
        )  # fmt: skip
    if int(y_all.min()) < 0 or int(y_all.max()) >= net.num_classes:
        raise FitError(
            f"labels of {ds.source or 'the data'} span {int(y_all.min())}..{int(y_all.max())}; "
            f"the backbone has {net.num_classes} outputs (expected labels 0..{net.num_classes - 1})."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return _Prepared(net, model, ds, y_all, normalization)


def _fit(cfg: FitConfig) -> FitResult:
    t0 = time.perf_counter()
    opts = _check_options(cfg.gate, cfg.score, cfg.hinge, cfg.holdout, cfg.epochs,
                          cfg.batch_size, cfg.joint, cfg.cost_weight)
    l2 = gate_kind(cfg.gate).l2 if cfg.l2 is None else float(cfg.l2)
    lr = _DEFAULT_LR if cfg.lr is None else float(cfg.lr)
    prep = _prepare(cfg, opts["score"])
    net, ds, y_all, norm = prep.net, prep.ds, prep.y, prep.normalization
    costs = exit_costs(net)
    fractions = [c / costs[-1] for c in costs]
    train_idx, hold_idx = holdout_split(len(ds), cfg.holdout, cfg.seed)
    if len(train_idx) < 2:
        raise FitError(f"only {len(train_idx)} training samples after the holdout; expected at least 2")
    progress = cfg.progress
    feats = extract_features(net, ds.images, norm, cfg.feature_batch_size,
                             "backbone features" if progress else False)
    backbone_acc = None
    if cfg.check_accuracy:
        backbone_acc = check_backbone_accuracy(
            feats.logits.numpy(), y_all, normalization=norm, source=ds.source or "the data"
        )
    y = torch.from_numpy(y_all)
    losses = train_heads(
        list(net.gates), feats.subset(torch.from_numpy(train_idx)), y[train_idx], hinge=cfg.hinge,
        l2=l2, standardize=cfg.standardize, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr,
        costs=fractions, cost_weight=cfg.cost_weight, seed=cfg.seed, progress=progress,
    )  # fmt: skip
    if cfg.joint:
        losses = _fine_tune_jointly(
            net, ds.images[train_idx], y[train_idx], norm, fractions, l2=l2,
            epochs=cfg.joint_epochs, batch_size=cfg.batch_size, lr=cfg.joint_lr,
            cost_weight=cfg.cost_weight, seed=cfg.seed, progress=progress,
        )  # fmt: skip
        hold = extract_features(net, ds.images[hold_idx], norm, cfg.feature_batch_size,
                                "held-out features" if progress else False)
    else:
        hold = feats.subset(torch.from_numpy(hold_idx))
    reports, final_acc = gate_reports(net, net.cuts, hold, y_all[hold_idx], losses)
    net.thresholds = [r.threshold for r in reports]
    options = {
        **opts, "l2": l2, "standardize": bool(cfg.standardize), "epochs": int(cfg.epochs),
        "batch_size": int(cfg.batch_size), "lr": lr,
        "joint_epochs": int(cfg.joint_epochs) if cfg.joint else 0,
        "joint_lr": float(cfg.joint_lr) if cfg.joint else None, "seed": int(cfg.seed),
        "data": ds.source, "train_samples": len(train_idx), "holdout_samples": len(hold_idx),
        "cuts": list(net.cuts), "layouts": [g.layout for g in net.gates],
        "backbone_accuracy": backbone_acc,
    }  # fmt: skip
    result = FitResult(net, reports, final_acc, costs, options, time.perf_counter() - t0)
    net.fit_record = result.as_dict()
    return result


def _check_options(
    gate: str, score: str | None, hinge: str, holdout: float, epochs: int, batch_size: int,
    joint: bool, cost_weight: float,
) -> dict[str, Any]:  # fmt: skip
    kind = gate_kind(gate, fittable=True)
    score = kind.check_score(score)
    if hinge not in HINGES:
        raise FitError(f"hinge {hinge!r} is unknown; expected one of {', '.join(HINGES)}")
    if not 0.0 <= holdout < 1.0:
        raise FitError(f"holdout is {holdout}; expected a share in [0, 1), e.g. 0.1")
    if epochs < 1 or batch_size < 1:
        raise FitError(f"epochs={epochs}, batch_size={batch_size}; expected positive integers")
    if joint and "joint" not in kind.options:
        raise FitError(
            f"joint fine-tuning was asked for {gate} gates; it exists for confidence gates "
            "(EENet's L_v2 trains backbone and exits together). The other gates "
            "are fitted on a frozen backbone, as in the d-gate paper. Fix: drop --joint or "
            "use --gate confidence."
        )
    if cost_weight < 0:
        raise FitError(f"cost_weight is {cost_weight}; expected >= 0 (EENets use 1)")
    return {"gate": gate, "score": score, "hinge": hinge if "hinge" in kind.options else None,
            "holdout": float(holdout), "joint": bool(joint), "cost_weight": float(cost_weight)}  # fmt: skip


def resolve_backbone(
    backbone: nn.Module | str | Path, arch: str | dict[str, Any] | None, trust_pickle: bool
) -> tuple[nn.Module, dict[str, Any] | None, dict[str, Any]]:
    """The backbone module, its architecture spec (for weights-only saving) and what its
    checkpoint records (``{}`` for a module)."""
    from dgconvert.gating.checkpoint import load_backbone

    spec = {"factory": arch, "kwargs": {}} if isinstance(arch, str) else arch
    if isinstance(backbone, nn.Module):
        return backbone, spec, {}
    if spec is None:
        model, info = load_backbone(backbone, trust_pickle=trust_pickle)
    else:
        model, info = load_backbone(
            backbone, arch=spec["factory"], arch_kwargs=spec.get("kwargs"), trust_pickle=trust_pickle
        )
    # a whole pickle records no architecture: the given one (if any) lets dg.save rebuild it
    return model, info.get("arch") or spec, info


def resolve_data(data: str | Dataset) -> Dataset:
    """``data`` as a :class:`~dgconvert.data.Dataset` (a ``--data`` spec is loaded)."""
    from dgconvert.data import Dataset, load_dataset

    if isinstance(data, str):
        return load_dataset(data)
    if not isinstance(data, Dataset):
        raise FitError(
            f"data is a {type(data).__name__}; expected a --data spec such as "
            "'fashion-mnist:train' or a dgconvert.data.Dataset"
        )
    return data


def holdout_split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, held-out) indices of ``n`` samples, ``holdout`` of them held out."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(holdout * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


def gate_reports(
    net: GatedNetwork, cuts: list[str], hold: Features, y: np.ndarray, losses: list[float]
) -> tuple[list[GateReport], float | None]:
    """Per-gate held-out curves and initial thresholds (defaults when nothing is held out)."""
    reports = []
    if len(y) == 0:
        for k, g in enumerate(net.gates):
            reports.append(GateReport(k, cuts[k], g.gate_type, g.score_kind, g.in_features,
                                      losses[k], GatedNetwork.default_threshold(g)))  # fmt: skip
        return reports, None
    final_correct = hold.logits.argmax(1).numpy() == y
    scores, labels = gate_outputs(list(net.gates), hold.pooled)
    for k, g in enumerate(net.gates):
        correct = labels[:, k] == y
        t = initial_threshold(scores[:, k], correct, final_correct)
        hit = ExitRule.from_thresholds([t]).exits(0, scores[:, k])
        reports.append(
            GateReport(
                index=k,
                cut=cuts[k],
                type=g.gate_type,
                score=g.score_kind,
                in_features=g.in_features,
                train_loss=float(losses[k]),
                threshold=t,
                holdout_accuracy=float(correct.mean()),
                exit_rate=float(hit.mean()),
                exit_accuracy=float(correct[hit].mean()) if hit.any() else None,
                curve=coverage_curve(scores[:, k], correct),
            )
        )
    return reports, float(final_correct.mean())


def _fine_tune_jointly(
    net: GatedNetwork,
    images: np.ndarray,
    y: torch.Tensor,
    normalization: dict[str, Any] | None,
    costs: Sequence[float],
    *,
    l2: float,
    epochs: int,
    batch_size: int,
    lr: float,
    cost_weight: float,
    seed: int,
    progress: bool,
) -> list[float]:
    """EENet-style joint training of backbone and confidence exits with ``L_v2``.

    BatchNorm layers keep their running statistics (eval mode): fine-tuning a trained
    backbone on top of them is stabler than re-estimating them batch by batch.
    """
    from dgconvert.core.preprocess import normalize

    params = [p for s in net.stages for p in s.parameters()]
    for p in params:
        p.requires_grad_(True)
    heads = list(net.gates)
    head_params = [p for h in heads for p in h.parameters()]
    n = len(y)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        xb = images[idx.numpy()]
        x = torch.from_numpy(normalize(xb, normalization) if xb.dtype == np.uint8 else xb)
        xs = []
        for stage in net.stages[:-1]:
            x = stage(x)
            xs.append(x)
        final_p = torch.softmax(net.stages[-1](x), 1)
        return _lv2_step(heads, xs, final_p, y[idx], costs, cost_weight)

    bar = progress_bar(epochs * math.ceil(n / batch_size), "fine-tune jointly" if progress else False,
               "joint", "step")
    net.eval()
    try:
        last = sgd(params + head_params, loss_fn, n, epochs, batch_size, lr, l2,
                    [lin for h in heads for lin in _linears(h)], seed, bar)
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
        net.eval()
    return [last] * len(heads)
