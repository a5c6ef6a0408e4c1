"""`GatedNetwork`: a backbone cut into stages with a gate head after each but the last."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dgconvert.core.exits import ExitRule, GatedResult
from dgconvert.core.gates import DEFAULT_EXIT_SCORE, gate_kind
from dgconvert.gating.configs import (
    CutBackboneConfig,
    GaterNetExitsConfig,
    MultiExitConfig,
    NetworkConfig,
)
from dgconvert.gating.cut import auto_cuts, cut_backbone
from dgconvert.gating.heads import FinalHead, GateHead, check_layout, feature_size, make_gate
from dgconvert.gating.multi_exit import split_multi_exit

logger = logging.getLogger(__name__)


class AllExits(NamedTuple):
    """Every gate evaluated on every sample (no early exit)."""

    scores: torch.Tensor  # [N, K]
    labels: torch.Tensor  # [N, K]
    final_logits: torch.Tensor  # [N, C]


def _check_thresholds(thresholds: Sequence[float], k: int) -> list[float]:
    t = [float(v) for v in thresholds]
    if len(t) != k:
        raise ValueError(f"got {len(t)} thresholds {t}; expected one per gate ({k})")
    return t


class GatedNetwork(nn.Module):
    """Stages ``S0 … SK`` and gates ``G0 … G(K-1)``; sample exits at the first gate with
    ``score >= threshold[k]`` and takes that gate's label, else the final stage's label.

    Build it from explicit stages and gates, or with :meth:`from_backbone` /
    :meth:`from_multi_exit` (or a family's ``build``, :mod:`dgconvert.gating.families`).
    ``family`` names the family that built it, ``config`` is that family's typed config
    (what rebuilds it), ``backbone`` the model the stages share their parameters with.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        gates: Sequence[GateHead],
        num_classes: int,
        *,
        input_shape: Sequence[int],
        normalization: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        thresholds: Sequence[float] | None = None,
        family: str = "cut-backbone",
        config: NetworkConfig | None = None,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(stages) != len(gates) + 1:
            raise ValueError(
                f"got {len(stages)} stages and {len(gates)} gates; expected one gate after "
                "every stage but the last (len(stages) == len(gates) + 1)"
            )
        self.stages = nn.ModuleList(stages)
        self.gates = nn.ModuleList(gates)
        self.final_head = FinalHead()
        self.num_classes = int(num_classes)
        self.input_shape = [int(s) for s in input_shape]
        self.normalization = dict(normalization) if normalization else None
        self.classes = list(classes) if classes else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"got {len(self.classes)} class names for {num_classes} classes")
        self.thresholds = (
            _check_thresholds(thresholds, len(gates))
            if thresholds is not None
            else [self.default_threshold(g) for g in gates]
        )
        #: the family that built it (dgconvert.gating.families) and its typed config
        self.family = family
        self.config = config
        #: what fitting found (FitResult.as_dict()), saved with the checkpoint
        self.fit_record: dict[str, Any] | None = None
        self._backbone = backbone

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a whole pickle written before families (a ``meta`` dict instead of
        ``family`` / ``config``) gets its typed record from that dict."""
        meta = state.pop("meta", None)
        super().__setstate__(state)
        if meta is not None and "family" not in state:
            self.family, self.config, self.fit_record = _from_meta(self, meta)

    @property
    def meta(self) -> dict[str, Any]:
        """Read-only view in the shape of the old free-form ``meta`` dict (``cuts``,
        ``arch``, ``multi_exit``, ``gaternet``, ``fit``), for callers written before ``family`` /
        ``config`` / ``fit_record``; dgconvert itself reads the typed attributes."""
        cfg = self.config
        out: dict[str, Any] = {"cuts": self.cuts} if self.cuts else {}
        if isinstance(cfg, MultiExitConfig):
            out["multi_exit"] = {"exits": list(cfg.exits), "score": cfg.score,
                                 "outputs": list(cfg.outputs)}
        if isinstance(cfg, GaterNetExitsConfig):
            out["gaternet"] = {"gated": list(cfg.gated), "gates": cfg.num_filter_gates}
        if cfg is not None and cfg.arch:
            out["arch"] = cfg.arch
        if self.fit_record is not None:
            out["fit"] = self.fit_record
        return out

    @staticmethod
    def default_threshold(gate: GateHead) -> float:
        """A conservative starting threshold per gate type (calibrate to do better)."""
        return gate_kind(gate.gate_type).threshold_for(gate.score_kind)

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def backbone(self) -> nn.Module | None:
        """The backbone the stages were cut from (shares its parameters), if any."""
        return self._backbone

    @classmethod
    def from_backbone(
        cls,
        model: nn.Module,
        cuts: Sequence[str] | int,
        gate: str | dict[str, Any] | Sequence[str | dict[str, Any]] = "dgate",
        num_classes: int | None = None,
        example_input: torch.Tensor | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        normalization: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        arch: dict[str, Any] | None = None,
        shares: Sequence[float] | None = None,
        layout: str | Sequence[str | None] | None = None,
        token_pool: str | None = None,
    ) -> GatedNetwork:
        """Cut ``model`` at the outputs of the named modules and attach a gate after each.

        ``cuts``: module names (``model.named_modules()``, nested ones included), or an int
        K: K single-tensor cut points picked at about equal FLOPs shares (``shares``: the
        cumulative FLOPs share wanted at each cut instead; see
        :func:`~dgconvert.gating.cut.auto_cuts`). ``gate`` is one spec for all gates or one
        per cut. ``example_input`` (or ``input_shape``, without the batch dim) fixes the gate
        input sizes. ``layout`` (one for all cuts or one per cut: ``nchw``, ``nhwc``,
        ``tokens``, ``vector``; default: detected from the feature shapes) says how each
        gate pools its features; ``token_pool`` (``cls`` or ``mean``) how token sequences
        are pooled (default: ``cls`` when the model has a class token, else ``mean``).
        ``arch`` (``{"factory": "module:callable", "kwargs": {...}}``) lets
        :func:`dgconvert.save` write a pickle-free checkpoint.
        """
        if example_input is None:
            if input_shape is None:
                raise ValueError("from_backbone needs example_input or input_shape")
            example_input = torch.zeros(2, *input_shape)
        if input_shape is None:
            input_shape = list(example_input.shape[1:])
        was_training = model.training
        model.eval()
        if isinstance(cuts, int) and not isinstance(cuts, bool):
            cuts = auto_cuts(model, cuts, example_input[:1], shares=shares)
            logger.info("automatic cut points: %s", ", ".join(cuts))
        elif isinstance(cuts, str):
            cuts = [c.strip() for c in cuts.split(",") if c.strip()]
        cuts = list(cuts)
        stages = cut_backbone(model, cuts)
        try:
            specs, shapes, logits = _gate_specs(model, stages, cuts, gate, layout, token_pool,
                                                example_input)
        finally:
            model.train(was_training)
        if num_classes is None:
            num_classes = int(logits.shape[1])
        elif logits.shape[1] != num_classes:
            raise ValueError(
                f"the backbone outputs {logits.shape[1]} logits, but num_classes={num_classes}"
            )
        heads = [
            make_gate(s, feature_size(shp, s["layout"], s.get("pool")), num_classes)
            for s, shp in zip(specs, shapes, strict=True)
        ]
        net = cls(stages, heads, num_classes, input_shape=input_shape,
                  normalization=normalization, classes=classes, family="cut-backbone",
                  backbone=model)
        net.config = CutBackboneConfig(
            cuts=list(cuts), gates=[_rebuild_spec(g.spec()) for g in heads],
            input_shape=net.input_shape,
            num_classes=net.num_classes, normalization=net.normalization, classes=net.classes,
            arch=arch)
        return net

    @classmethod
    def from_multi_exit(
        cls,
        model: nn.Module,
        exits: Sequence[str],
        score: str = DEFAULT_EXIT_SCORE,
        example_input: torch.Tensor | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        normalization: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
        arch: dict[str, Any] | None = None,
    ) -> GatedNetwork:
        """Convert a multi-exit model trained elsewhere (SDN, BranchyNet, MSDNet, EENets) as
        it is: ``model.forward`` returns one entry per exit (logits, or ``(logits,
        confidence)``), the final classifier's last; ``exits`` names the exit-head modules
        in execution order. The trunk is cut where each head reads it and each head becomes
        its stage's gate, scored by ``score`` (one of
        :data:`dgconvert.core.gates.EXIT_SCORES`). ``arch`` as in :meth:`from_backbone`.
        """
        if example_input is None:
            if input_shape is None:
                raise ValueError("from_multi_exit needs example_input or input_shape")
            example_input = torch.zeros(2, *input_shape)
        if input_shape is None:
            input_shape = list(example_input.shape[1:])
        parts = split_multi_exit(model, exits, score, example_input)
        net = cls(parts.stages, parts.gates, parts.num_classes, input_shape=input_shape,
                  normalization=normalization, classes=classes, family="multi-exit",
                  backbone=model)
        net.config = MultiExitConfig(
            exits=list(parts.exits), score=score, outputs=list(parts.outputs),
            input_shape=net.input_shape, num_classes=net.num_classes,
            normalization=net.normalization, classes=net.classes, arch=arch)
        return net

    @property
    def cuts(self) -> list[str]:
        """The module names the backbone was cut at (empty if built from explicit stages or
        from a multi-exit model)."""
        return list(getattr(self.config, "cuts", None) or [])

    def all_exits(self, x: torch.Tensor) -> AllExits:
        """Run every sample through every stage and every gate."""
        scores, labels = [], []
        for k, gate in enumerate(self.gates):
            x = self.stages[k](x)
            s, lab, _ = gate(x)
            scores.append(s)
            labels.append(lab)
        final = self.stages[-1](x)
        n = final.shape[0]
        return AllExits(
            torch.stack(scores, 1) if scores else final.new_zeros(n, 0),
            torch.stack(labels, 1) if labels else torch.zeros(n, 0, dtype=torch.long),
            final,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ungated model: the final stage's logits."""
        for stage in self.stages:
            x = stage(x)
        return x

    @torch.no_grad()
    def gated_forward(
        self,
        x: torch.Tensor,
        thresholds: Sequence[float] | None = None,
        return_scores: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | GatedResult:
        """Reference semantics, sample by sample: ``(labels, exit_stage)`` tensors, or with
        ``return_scores`` the :class:`~dgconvert.core.exits.GatedResult` (numpy) the
        runtime returns too.

        Computes every stage for every sample and picks each sample's first exit; this is
        the slow, obviously-correct definition the exported runtime is tested against.
        A gate whose threshold is +inf never exits; a NaN score never exits.
        """
        out = self.pick_exits(self.all_exits(x), thresholds)
        if return_scores:
            return out
        return torch.from_numpy(out.labels), torch.from_numpy(out.exit_stage)

    def pick_exits(self, out: AllExits, thresholds: Sequence[float] | None = None) -> GatedResult:
        """Each sample's first exit given every exit's outputs (:meth:`all_exits`)."""
        t = _check_thresholds(self.thresholds if thresholds is None else thresholds, self.num_gates)
        fs, fl, _ = self.final_head(out.final_logits)
        scores = out.scores.float().numpy()
        stage = ExitRule.from_thresholds(t).points(scores)  # compared as the runtime does
        labels = np.concatenate([out.labels.numpy(), fl.numpy()[:, None]], axis=1)
        all_scores = np.concatenate([scores, fs.float().numpy()[:, None]], axis=1)
        rows = np.arange(len(stage))
        return GatedResult(labels[rows, stage].astype(np.int64), stage,
                           all_scores[rows, stage].astype(np.float32))


def _from_meta(net: GatedNetwork, meta: dict[str, Any]) -> tuple[str, NetworkConfig, Any]:
    """``(family, config, fit record)`` of a network pickled with the old ``meta`` dict."""
    common = {"input_shape": net.input_shape, "num_classes": net.num_classes,
              "normalization": net.normalization, "classes": net.classes,
              "arch": meta.get("arch")}
    if meta.get("multi_exit"):
        me = meta["multi_exit"]
        return "multi-exit", MultiExitConfig(exits=list(me["exits"]), score=me["score"],
                                             outputs=list(me["outputs"]), **common), None
    gates = [_rebuild_spec(g.spec()) for g in net.gates]
    return ("cut-backbone", CutBackboneConfig(cuts=list(meta.get("cuts", [])), gates=gates,
                                              **common), meta.get("fit"))


def _rebuild_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The keys of a gate head's spec that rebuild it (the rest is derived)."""
    return {k: v for k, v in spec.items() if k in ("type", "score", "layout", "pool")}


def _gate_specs(
    model: nn.Module, stages: Sequence[nn.Module], cuts: list[str],
    gate: str | dict[str, Any] | Sequence[str | dict[str, Any]],
    layout: str | Sequence[str | None] | None, token_pool: str | None,
    example_input: torch.Tensor,
) -> tuple[list[dict[str, Any]], list[tuple[int, ...]], torch.Tensor]:
    """One full gate spec per cut (layout detected where not given, token pooling), the
    feature shapes at the cuts and the backbone's logits on ``example_input``."""
    specs = [gate] * len(cuts) if isinstance(gate, str | dict) else list(gate)
    if len(specs) != len(cuts):
        raise ValueError(f"got {len(specs)} gate specs for {len(cuts)} cuts")
    specs = [{"type": s} if isinstance(s, str) else dict(s) for s in specs]
    layouts = [layout] * len(cuts) if layout is None or isinstance(layout, str) else list(layout)
    if len(layouts) != len(cuts):
        raise ValueError(f"got {len(layouts)} layouts for {len(cuts)} cuts {cuts}")
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        x = example_input
        for stage in stages[:-1]:
            x = stage(x)
            shapes.append(tuple(x.shape))
        logits = stages[-1](x)
    if logits.dim() != 2:
        raise ValueError(
            f"the backbone's output has shape {list(logits.shape)}; expected logits "
            "[N, num_classes]. Fix: wrap the model so forward returns the class logits."
        )
    for k, spec in enumerate(specs):
        given = spec.get("layout") or layouts[k]
        spec["layout"] = given or detect_layout(
            shapes[k], lambda kk=k: _probe_shape(stages, kk, example_input), cuts[k]
        )
        if spec["layout"] == "tokens" and not spec.get("pool"):
            spec["pool"] = token_pool or default_token_pool(model)
        try:
            check_layout(spec["layout"], spec.get("pool"), shapes[k])
        except ValueError as exc:
            raise ValueError(f"gate after {cuts[k]!r}: {exc}") from exc
    return specs, shapes, logits


def default_token_pool(model: nn.Module) -> str:
    """``cls`` when ``model`` classifies from a class token, else ``mean``.

    A string ``global_pool`` attribute (timm: ``"token"`` / ``"avg"``) decides; otherwise a
    parameter named like a class token (``class_token``, ``cls_token``) means ``cls``.
    """
    gp = getattr(model, "global_pool", None)
    if isinstance(gp, str) and gp:
        return "cls" if gp == "token" else "mean"
    names = (n.rsplit(".", 1)[-1] for n, _ in model.named_parameters())
    return "cls" if any(n in ("class_token", "cls_token") for n in names) else "mean"


def detect_layout(
    shape: Sequence[int], probe: Any = None, where: str = "the cut"
) -> str:
    """The layout of features of ``shape`` (batch dim included): 2-D ``vector``, 3-D
    ``tokens``, 4-D ``nchw`` or ``nhwc`` — the two spatial axes are the equal pair (square
    inputs); when that does not decide, ``probe()`` (the shape at a larger input) shows which
    axes grow with the input. Undecidable: ``nchw``, logged."""
    shape = list(shape)
    if len(shape) == 2:
        return "vector"
    if len(shape) == 3:
        return "tokens"
    if len(shape) != 4:
        return "nchw"
    _, a, b, c = shape
    if b == c and a != b:
        return "nchw"
    if a == b and b != c:
        return "nhwc"
    other = None
    if probe is not None:
        try:
            other = list(probe())
        except Exception:  # a model with a fixed input size: no probe
            other = None
    if other is not None and len(other) == 4:
        grew = [o != s for o, s in zip(other[1:], shape[1:], strict=True)]
        if grew == [False, True, True]:
            return "nchw"
        if grew == [True, True, False]:
            return "nhwc"
    logger.warning(
        "features after %s have shape %s: cannot tell NCHW from NHWC; assuming nchw. "
        "Pass layout='nhwc' (CLI --layout nhwc) if the channels are last.",
        where,
        shape,
    )
    return "nchw"


@torch.no_grad()
def _probe_shape(stages: Sequence[nn.Module], k: int, example: torch.Tensor) -> tuple[int, ...]:
    """The shape of stage k's output for an input with doubled spatial size."""
    x = torch.nn.functional.interpolate(example[:1], scale_factor=2.0) if example.dim() == 4 else example[:1]
    for stage in stages[: k + 1]:
        x = stage(x)
    return tuple(x.shape)

