"""GaterNet (Chen et al., "You Look Twice: GaterNet for Dynamic Filter Selection in CNNs"):
a small *gater* network looks at the input and emits one binary gate per filter of the
backbone's gated layers; a gate of 0 zeroes that filter's output channel for that sample.

- :class:`ImprovedSemHash` turns the gater's real-valued gate logits into gates: during
  training noise ``ε ~ N(0, 1)`` is added, half of the samples use the saturating sigmoid
  ``σ'(g'+ε)`` and half the hard ``1(g'+ε > 0)`` with ``σ'``'s gradient; at evaluation and
  inference the gates are always hard, ``1(g' > 0)``, without noise.
- :class:`Gater`: a feature extractor ``E`` (a classifier with its output layer removed,
  by default a narrow zoo ResNet) and ``D``: ``FC → BatchNorm → ReLU → FC`` with a bottleneck,
  then Improved SemHash.
- :class:`GaterNet`: the gater plus the backbone traced with ``torch.fx``; after each gated
  layer (the output of a convolution block, normalization included) its channels are
  multiplied by the sample's gates. The paper gates the last convolution of each residual
  unit; here the default gates the *first* one (``conv1`` of each block): ``relu`` commutes
  with 0/1 gates and the next layer is a convolution, so a filter that is always off can be
  removed exactly — its convolution, its normalization and the next convolution's input
  channels (:func:`prune_always_off`).
- :func:`fit_gaternet`: gater pre-training, then gater and backbone trained jointly with
  cross-entropy plus a sparsity term (by default a hinge on the gates' usage above a target,
  else the paper's L1 term ``λ · mean(gates)``; the backbone gets no gradient from it), from
  the pre-trained backbone; then the rarely-on gates are forced off and the backbone is
  trained with the hard gates (settle).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from dgconvert.core.gates import (
    PRUNE_MULTIPLE,
    RATE_WEIGHTS,
    FilterGateLayer,
    format_filter_gates,
)
from dgconvert.gating.augment import random_crop_flip
from dgconvert.gating.checkpoint import build_arch
from dgconvert.gating.configs import GaterNetConfig
from dgconvert.gating.cut import trace_with_leaves
from dgconvert.gating.fit import (
    BackboneFitConfig,
    FitError,
    check_backbone_accuracy,
    holdout_split,
    resolve_backbone,
    resolve_data,
)
from dgconvert.gating.sgd import progress_bar, sgd
from dgconvert.gating.threads import torch_threads

if TYPE_CHECKING:
    from dgconvert.data import Dataset

__all__ = [
    "DEFAULT_GATER",
    "FilterGate",
    "Gater",
    "GaterNet",
    "GaterNetFit",
    "GaterNetFitConfig",
    "GaterNetError",
    "ImprovedSemHash",
    "PRUNE_MULTIPLE",
    "RATE_WEIGHTS",
    "default_gated_layers",
    "fit_gaternet",
    "filter_gate_counts",
    "force_off",
    "gate_flops",
    "gate_layers",
    "prune_always_off",
    "saturating_sigmoid",
]

#: The default gater: a narrow zoo ResNet (its classifier removed), about a sixth of the
#: reference backbone's FLOPs.
DEFAULT_GATER: dict[str, Any] = {"factory": "dgconvert.zoo:resnet",
                                 "kwargs": {"widths": [8, 16, 16, 32]}}
#: Gate logits start at this bias: every gate on, so training starts from the backbone
#: (low enough that the saturating sigmoid still passes the sparsity term's gradient).
_INIT_ON = 1.0
#: Keeps the gradient of sqrt(on-rate) finite for a gate off for the whole batch.
_USAGE_EPS = 1e-4
#: A forced-off gate's logit (weights zero): hard gate 0 for every input.
_OFF_LOGIT = -1.0


class GaterNetError(FitError):
    """A GaterNet cannot be built, fitted or pruned as asked."""


def saturating_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``σ'(x) = max(0, min(1, 1.2 σ(x) − 0.1))``."""
    return torch.clamp(1.2 * torch.sigmoid(x) - 0.1, 0.0, 1.0)


class ImprovedSemHash(nn.Module):
    """Gate logits ``[N, c]`` -> gates ``[N, c]``: noisy, half soft and half hard (with the
    soft gates' gradient) in training; hard ``1(g' > 0)`` in evaluation."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (logits > 0).to(logits.dtype)
        noisy = logits + torch.randn_like(logits)
        soft = saturating_sigmoid(noisy)
        hard = (noisy > 0).to(logits.dtype) + (soft - soft.detach())  # value: exactly 0/1
        pick = torch.rand(logits.shape[0], 1, device=logits.device) < 0.5
        return torch.where(pick, soft, hard)


class Gater(nn.Module):
    """``E``: ``extractor`` (images -> feature vectors ``[N, h]``); ``D``: ``FC(h→b)``,
    BatchNorm, ReLU, ``FC(b→c)``; then :class:`ImprovedSemHash`."""

    def __init__(self, extractor: nn.Module, features: int, num_filter_gates: int,
                 bottleneck: int = 8) -> None:
        super().__init__()
        self.extractor = extractor
        self.fc1 = nn.Linear(features, bottleneck)
        self.bn = nn.BatchNorm1d(bottleneck)
        self.fc2 = nn.Linear(bottleneck, num_filter_gates)
        self.semhash = ImprovedSemHash()
        with torch.no_grad():
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.fill_(_INIT_ON)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The real-valued gate vector ``g'``."""
        f = torch.flatten(self.extractor(x), 1)
        return self.fc2(torch.relu(self.bn(self.fc1(f))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.semhash(self.logits(x))


class FilterGate(nn.Module):
    """A gated layer's filter gates (GaterNet's per-sample filter switches, not exit gates):
    ``y * gates[:, start:end]`` broadcast over the spatial axes of NCHW ``y``."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__()
        self.start, self.end = int(start), int(end)

    def forward(self, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return y * gates[:, self.start : self.end, None, None]

    def extra_repr(self) -> str:
        return f"gates[{self.start}:{self.end}]"


@dataclass
class GatedLayer:
    """One gated layer: the module whose output channels are gated, and how many."""

    name: str
    filters: int


def _out_channels(mod: nn.Module, name: str) -> int:
    last = None
    for m in mod.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m.num_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    if last is None:
        raise GaterNetError(
            f"gated layer {name!r} ({type(mod).__name__}) has no Conv2d or BatchNorm2d; expected "
            "a convolution block whose output channels the gates switch (e.g. layer1.0.conv1)."
        )
    return int(last)


def default_gated_layers(model: nn.Module) -> list[str]:
    """Every residual block's first convolution block (``bn1`` when the block has one,
    torchvision-style, else ``conv1``): modules with both ``conv1`` and ``conv2``."""
    names = []
    for name, mod in model.named_modules():
        if hasattr(mod, "conv1") and hasattr(mod, "conv2"):
            child = "bn1" if isinstance(getattr(mod, "bn1", None), nn.BatchNorm2d) else "conv1"
            names.append(f"{name}.{child}" if name else child)
    if not names:
        raise GaterNetError(
            f"{type(model).__name__} has no residual blocks with conv1/conv2; expected the "
            "gated layers by name. Fix: pass gated=[...] (CLI --gated) with module names "
            "whose output channels to gate."
        )
    return names


def gate_layers(model: nn.Module, gated: Sequence[str]) -> tuple[fx.GraphModule, list[GatedLayer]]:
    """Trace ``model`` with ``torch.fx`` and multiply each gated layer's output by its slice
    of a new ``gates [N, c]`` input: returns the traced ``body(x, gates) -> logits`` and the
    gated layers in gate-vector order."""
    modules = dict(model.named_modules())
    missing = [g for g in gated if g not in modules]
    if missing or not gated:
        raise GaterNetError(
            f"gated layers {missing or list(gated)} are not modules of {type(model).__name__}; "
            f"expected names from model.named_modules(), e.g. {default_gated_layers(model)[:3]}"
        )
    gm = trace_with_leaves(model, list(gated))
    graph = gm.graph
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in gated}
    absent = [g for g in gated if g not in nodes]
    if absent:
        raise GaterNetError(f"gated layers {absent} are not called by the model's forward")
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in gated]
    if len(calls) != len(nodes):
        raise GaterNetError("a gated layer is called more than once; expected one call each")
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first):
        gates = graph.placeholder("gates")
    layers, start = [], 0
    for i, node in enumerate(calls):  # execution order = gate-vector order
        filters = _out_channels(modules[str(node.target)], str(node.target))
        gm.add_submodule(f"gaternet_gate{i}", FilterGate(start, start + filters))
        with graph.inserting_after(node):
            gated_node = graph.call_module(f"gaternet_gate{i}", (node, gates))
        node.replace_all_uses_with(gated_node, delete_user_cb=lambda u, g=gated_node: u is not g)
        layers.append(GatedLayer(str(node.target), filters))
        start += filters
    graph.lint()
    gm.recompile()
    return gm, layers


class GaterNet(nn.Module):
    """A gater and a gated backbone: ``forward(x) = body(x, gater(x))`` -> logits.

    ``family`` / ``config`` (a :class:`~dgconvert.gating.configs.GaterNetConfig`) record how
    to rebuild it (backbone ``arch``, ``gater`` spec, gated layers); ``fit_record`` and
    ``pruned`` what fitting and pruning found.
    """

    family = "gaternet"

    def __init__(self, gater: Gater, body: fx.GraphModule, layers: Sequence[GatedLayer], *,
                 num_classes: int, input_shape: Sequence[int],
                 normalization: dict[str, Any] | None = None,
                 classes: Sequence[str] | None = None,
                 config: GaterNetConfig | None = None) -> None:
        super().__init__()
        self.gater, self.body = gater, body
        self.layers = list(layers)
        self.num_classes = int(num_classes)
        self.input_shape = [int(s) for s in input_shape]
        self.normalization = dict(normalization) if normalization else None
        self.classes = list(classes) if classes else [str(i) for i in range(self.num_classes)]
        self.config = config or GaterNetConfig(
            gated=[lay.name for lay in self.layers], input_shape=self.input_shape,
            num_classes=self.num_classes, normalization=self.normalization,
            classes=self.classes)
        #: what fitting found (GaterNetFit.as_dict()), saved with the checkpoint
        self.fit_record: dict[str, Any] | None = None
        #: after prune_always_off: {"removed": filters removed, "gates": gates before,
        #: "off": the gates asked off, "multiple": the channel multiple} (rebuilds it)
        self.pruned: dict[str, Any] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """Read-only view in the shape of the old free-form ``meta`` dict (``gated``,
        ``gater``, ``arch``, ``fit``, ``pruned``); dgconvert reads the typed attributes."""
        cfg = self.config
        out: dict[str, Any] = {"gated": list(cfg.gated or []),
                               "gater": {**(cfg.gater or {}), "bottleneck": cfg.bottleneck}}
        extra = {"arch": cfg.arch, "fit": self.fit_record, "pruned": self.pruned}
        return {**out, **{k: v for k, v in extra.items() if v is not None}}

    @classmethod
    def build(cls, backbone: nn.Module, gated: Sequence[str] | None = None,
              gater: dict[str, Any] | None = None, *, bottleneck: int = 8,
              input_shape: Sequence[int], num_classes: int,
              extractor: nn.Module | None = None, arch: dict[str, Any] | None = None,
              normalization: dict[str, Any] | None = None,
              classes: Sequence[str] | None = None) -> GaterNet:
        """Gate ``gated`` layers of ``backbone`` (default: :func:`default_gated_layers`) and
        attach a gater built from ``gater`` (``{"factory", "kwargs"}``, default
        :data:`DEFAULT_GATER`) or from an ``extractor`` classifier given (e.g. pre-trained);
        its output layer is removed."""
        gated = list(gated) if gated else default_gated_layers(backbone)
        body, layers = gate_layers(backbone, gated)
        spec = copy.deepcopy(gater or DEFAULT_GATER)
        spec.setdefault("kwargs", {})
        if spec["factory"] == DEFAULT_GATER["factory"]:
            spec["kwargs"].setdefault("in_channels", int(input_shape[0]))
            spec["kwargs"].setdefault("num_classes", int(num_classes))
        if extractor is None:
            extractor = build_arch(spec)
        features = strip_classifier(extractor)
        net_gater = Gater(extractor, features, sum(lay.filters for lay in layers), bottleneck)
        net = cls(net_gater, body, layers, num_classes=num_classes, input_shape=input_shape,
                  normalization=normalization, classes=classes)
        net.config = GaterNetConfig(
            gated=gated, gater=spec, bottleneck=int(bottleneck), input_shape=net.input_shape,
            num_classes=net.num_classes, normalization=net.normalization, classes=net.classes,
            arch=arch)
        return net

    @property
    def num_filter_gates(self) -> int:
        return sum(lay.filters for lay in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x, self.gater(x))

    @torch.no_grad()
    def hard_gates(self, x: torch.Tensor) -> torch.Tensor:
        """The 0/1 gates ``[N, c]`` of inference (no noise)."""
        return (self.gater.logits(x) > 0).to(x.dtype)


def strip_classifier(model: nn.Module) -> int:
    """Replace ``model``'s final linear layer (``fc``, ``classifier`` or ``head``) by an
    identity, in place, so that it returns feature vectors; return their size."""
    for attr in ("fc", "classifier", "head"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return int(layer.in_features)
    raise GaterNetError(
        f"the gater {type(model).__name__} has no final nn.Linear named fc, classifier or "
        "head to remove; expected a classifier such as dgconvert.zoo:resnet."
    )


# --------------------------------------------------------------------------- gates, pruning


@torch.no_grad()
def filter_gate_counts(net: GaterNet, images: np.ndarray, batch_size: int = 512,
                progress: bool | str = False) -> np.ndarray:
    """How many of ``images`` (uint8, normalized with the net's normalization, or float)
    switch each gate on: ``[c]`` int64."""
    from dgconvert.core.preprocess import normalize

    net.eval()
    counts = np.zeros(net.num_filter_gates, np.int64)
    bar = progress_bar(len(images), progress, "gates", "img")
    for start in range(0, len(images), batch_size):
        xb = images[start : start + batch_size]
        x = torch.from_numpy(normalize(xb, net.normalization) if xb.dtype == np.uint8 else xb)
        counts += net.hard_gates(x.float()).sum(0).long().numpy()
        bar.update(len(xb))
    bar.close()
    return counts


def distribution(net: GaterNet, counts: np.ndarray, samples: int,
                 pruned: np.ndarray | None = None) -> list[FilterGateLayer]:
    """Per gated layer: always-on / always-off / input-dependent gates (and pruned ones)."""
    out, start = [], 0
    for lay in net.layers:
        sl = slice(start, start + lay.filters)
        n_pruned = 0 if pruned is None else int(np.asarray(pruned)[sl].sum())
        out.append(FilterGateLayer.from_counts(lay.name, counts[sl], samples, n_pruned))
        start += lay.filters
    return out


def _set_rows_off(fc: nn.Linear, rows: np.ndarray) -> None:
    with torch.no_grad():
        idx = torch.from_numpy(np.flatnonzero(rows))
        fc.weight[idx] = 0.0
        fc.bias[idx] = _OFF_LOGIT


def force_off(net: GaterNet, off: np.ndarray) -> GaterNet:
    """A copy of ``net`` whose gates ``off`` (bool ``[c]``) are 0 for every input: the
    *masked* model that :func:`prune_always_off` removes those filters from, exactly."""
    off = _check_mask(net, off)
    new = copy.deepcopy(net)
    _set_rows_off(new.gater.fc2, off)
    return new


def _check_mask(net: GaterNet, off: np.ndarray) -> np.ndarray:
    off = np.asarray(off, bool)
    if off.shape != (net.num_filter_gates,):
        raise GaterNetError(f"got a gate mask of shape {off.shape}; expected ({net.num_filter_gates},)")
    return off


_PASS_THROUGH = {torch.relu, nn.functional.relu}


def _consumer(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str]:
    """The convolution that reads ``node``'s channels through zero-preserving elementwise ops
    only (relu), or ``(None, why)``."""
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None, f"its output has {len(users)} users (expected one convolution)"
        u = users[0]
        if u.op == "call_function" and u.target in _PASS_THROUGH:
            cur = u
            continue
        if u.op == "call_method" and u.target == "relu":
            cur = u
            continue
        if u.op == "call_module":
            mod = gm.get_submodule(str(u.target))
            if isinstance(mod, nn.ReLU):
                cur = u
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and u.args[0] is cur:
                return str(u.target), ""
        return None, f"it is read by {u.op} {u.target} (expected a convolution after relu)"


def _producers(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, list[str]] | None:
    """The convolution (and batch norm) whose output channels ``node`` (a gated layer's
    call) produces, with their qualified names."""
    mod = gm.get_submodule(str(node.target))
    name = str(node.target)
    if isinstance(mod, nn.Sequential):
        parts = list(mod)
        if len(parts) in (1, 2) and isinstance(parts[0], nn.Conv2d) and parts[0].groups == 1 and (
                len(parts) == 1 or isinstance(parts[1], nn.BatchNorm2d)):
            return parts[0], parts[1] if len(parts) == 2 else None, [f"{name}.0", f"{name}.1"]
        return None
    if isinstance(mod, nn.Conv2d) and mod.groups == 1:
        return mod, None, [name]
    if isinstance(mod, nn.BatchNorm2d):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
            conv = gm.get_submodule(str(src.target))
            if isinstance(conv, nn.Conv2d) and conv.groups == 1:
                return conv, mod, [str(src.target), name]
    return None


def _replace(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, new)


def _slim_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_keep is not None:
        w = w[out_keep]
    if in_keep is not None:
        w = w[:, in_keep]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            b = conv.bias.detach()
            new.bias.copy_(b[out_keep] if out_keep is not None else b)
    return new.train(conv.training)


def _slim_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(int(keep.numel()), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, attr)
            if src is not None:
                getattr(new, attr).copy_(src.detach()[keep])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


@dataclass
class PruneResult:
    """The pruned network, which gates were removed, and per-layer notes."""

    net: GaterNet
    removed: np.ndarray  # bool [c] over the unpruned gate vector
    notes: dict[str, str] = field(default_factory=dict)  # layer -> why it was not pruned


def _removable(layer_off: np.ndarray, multiple: int) -> np.ndarray:
    """The off filters of one layer that can go so that a multiple of ``multiple`` channels
    (at least one) stays: the first off ones stay, gated off for every input."""
    out = layer_off.copy()
    kept = int((~out).sum())
    stay = min(len(out), max(1, -(-kept // multiple) * multiple)) - kept
    out[np.flatnonzero(out)[:max(stay, 0)]] = False
    return out


@torch.no_grad()
def prune_always_off(net: GaterNet, off: np.ndarray, multiple: int = 1) -> PruneResult:
    """Remove the filters whose gates are ``off`` (bool ``[c]``, e.g. off for every
    calibration sample): their convolution's output channels, their normalization's channels,
    the next convolution's input channels and the gater's rows. The result equals
    :func:`force_off` ``(net, off)`` on every input (up to float summation order); a layer
    whose channels cannot be traced to one next convolution keeps them (gated off, not
    removed; ``notes`` says why). Each pruned layer keeps a multiple of ``multiple``
    channels (some off filters stay, gated off for every input; :data:`PRUNE_MULTIPLE` suits
    ONNX Runtime on the CPU); a layer with every gate off keeps at least one.
    """
    if multiple < 1:
        raise GaterNetError(f"multiple={multiple}; expected a channel multiple >= 1 (1: remove "
                            f"every off filter, {PRUNE_MULTIPLE}: keep ONNX Runtime's blocked layout)")
    off = _check_mask(net, off)
    new = force_off(net, off)  # forced-off rows stay off where a channel has to stay
    gm = new.body
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    keep_rows: list[np.ndarray] = []
    removed = np.zeros_like(off)
    notes: dict[str, str] = {}
    start = 0
    for i, lay in enumerate(net.layers):
        sl = slice(start, start + lay.filters)
        layer_off = _removable(off[sl], multiple)
        start += lay.filters
        gate_node = calls[f"gaternet_gate{i}"]
        src = gate_node.args[0]
        prod = _producers(gm, src) if isinstance(src, fx.Node) else None
        consumer, why = _consumer(gm, gate_node)
        if not layer_off.any() or prod is None or consumer is None:
            if off[sl].any() and (prod is None or consumer is None):
                notes[lay.name] = why or "its convolution/normalization could not be found"
            keep_rows.append(np.ones(lay.filters, bool))
            continue
        keep = torch.from_numpy(np.flatnonzero(~layer_off))
        conv, bn, names = prod
        _replace(gm, names[0], _slim_conv(conv, keep, None))
        if bn is not None:
            _replace(gm, names[1], _slim_bn(bn, keep))
        nxt = gm.get_submodule(consumer)
        assert isinstance(nxt, nn.Conv2d)
        _replace(gm, consumer, _slim_conv(nxt, None, keep))
        keep_rows.append(~layer_off)
        removed[sl] = layer_off
    rows = np.concatenate(keep_rows)
    idx = torch.from_numpy(np.flatnonzero(rows))
    fc2 = new.gater.fc2
    slim = nn.Linear(fc2.in_features, int(idx.numel()))
    slim.weight.copy_(fc2.weight[idx])
    slim.bias.copy_(fc2.bias[idx])
    new.gater.fc2 = slim.train(fc2.training)
    layers, start = [], 0
    for i, (lay, kr) in enumerate(zip(net.layers, keep_rows, strict=True)):
        kept = int(kr.sum())
        gate = gm.get_submodule(f"gaternet_gate{i}")
        assert isinstance(gate, FilterGate)
        gate.start, gate.end = start, start + kept
        layers.append(GatedLayer(lay.name, kept))
        start += kept
    new.layers = layers
    gm.recompile()
    new.pruned = {"removed": int(removed.sum()), "gates": int(net.num_filter_gates),
                  "off": [int(i) for i in np.flatnonzero(off)], "multiple": int(multiple)}
    return PruneResult(new, removed, notes)


@torch.no_grad()
def gate_flops(net: GaterNet) -> np.ndarray:
    """Per gate, the FLOPs per image that pruning its filter saves (its convolution and
    normalization channel and the next convolution's input channel): float64 ``[c]``,
    measured by pruning one filter of each gated layer; 0 where a filter cannot be pruned."""
    from dgconvert.gating.flops import count_flops

    training = net.training
    net.eval()  # one image: batch norm in evaluation mode
    one = torch.zeros(1, *net.input_shape)
    full = count_flops(net, one)
    out, start = np.zeros(net.num_filter_gates), 0
    for lay in net.layers:
        off = np.zeros(net.num_filter_gates, bool)
        off[start] = True
        pruned = prune_always_off(net, off)
        if pruned.removed.any():
            out[start : start + lay.filters] = full - count_flops(pruned.net, one)
        start += lay.filters
    net.train(training)
    return out


# --------------------------------------------------------------------------- fitting


@dataclass
class GaterNetFit:
    """What :func:`fit_gaternet` returns."""

    net: GaterNet
    backbone_accuracy: float | None  # the plain backbone on the held-out data
    accuracy: float | None  # the GaterNet on the held-out data
    layers: list[FilterGateLayer]  # gate kinds on the held-out data
    options: dict[str, Any]
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"options": self.options, "backbone_accuracy": self.backbone_accuracy,
                "accuracy": self.accuracy, "layers": [lay.to_dict() for lay in self.layers],
                "losses": self.losses, "seconds": round(self.seconds, 2)}

    def table(self) -> str:
        """Accuracy of backbone and GaterNet, then the gate kinds per layer."""
        lines = []
        if self.accuracy is not None:
            lines.append(f"held-out accuracy: backbone {100 * (self.backbone_accuracy or 0):.2f} %, "
                         f"GaterNet {100 * self.accuracy:.2f} % "
                         f"({self.options.get('holdout_samples')} samples)")
        lines.append(format_filter_gates(self.layers))
        return "\n".join(lines)


class _Batches:
    """Training batches: uint8 images augmented (random crop + flip), then normalized."""

    def __init__(self, images: np.ndarray, normalization: dict[str, Any] | None,
                 augment: bool, seed: int) -> None:
        self.images, self.normalization, self.augment = images, normalization, augment
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        from dgconvert.core.preprocess import normalize

        xb = self.images[idx.numpy()]
        if xb.dtype != np.uint8:
            return torch.from_numpy(np.ascontiguousarray(xb, np.float32))
        if self.augment and xb.ndim == 4:
            xb = random_crop_flip(torch.from_numpy(xb), 2, True, self.gen).numpy()
        return torch.from_numpy(normalize(xb, self.normalization))


@torch.no_grad()
def _accuracy(model: nn.Module, images: np.ndarray, y: np.ndarray,
              normalization: dict[str, Any] | None, batch_size: int = 1000) -> tuple[float, np.ndarray]:
    from dgconvert.core.preprocess import normalize

    model.eval()
    logits = []
    for s in range(0, len(images), batch_size):
        xb = images[s : s + batch_size]
        x = torch.from_numpy(normalize(xb, normalization) if xb.dtype == np.uint8 else xb)
        logits.append(model(x.float()))
    out = torch.cat(logits).numpy() if logits else np.zeros((0, 1), np.float32)
    return (float((out.argmax(1) == y).mean()) if len(y) else float("nan")), out


def _decayed(*modules: nn.Module) -> list[nn.Module]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@dataclass(kw_only=True)
class GaterNetFitConfig(BackboneFitConfig):
    """Options of :func:`fit_gaternet` (the ``gaternet`` family's ``fit``)."""

    gated: Sequence[str] | None = None
    gater: dict[str, Any] | str | None = None
    bottleneck: int = 8
    gater_epochs: int = 1
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.02
    gater_lr: float = 0.1
    gater_lr_scale: float = 10.0
    sparsity: float = 2.0
    target_rate: float | None = 0.7
    rate_weights: str = "filters"
    off_below: float = 0.5
    settle_epochs: int = 5
    weight_decay: float = 5e-4
    augment: bool = True
    threads: int | None = None

    def check(self) -> None:
        """Raise :class:`GaterNetError` naming the options out of range."""
        if (self.epochs < 1 or self.batch_size < 1 or self.gater_epochs < 0
                or self.bottleneck < 1 or self.settle_epochs < 0):
            raise GaterNetError(
                f"epochs={self.epochs}, gater_epochs={self.gater_epochs}, batch_size="
                f"{self.batch_size}, bottleneck={self.bottleneck}; expected epochs, batch_size, "
                "bottleneck >= 1, gater_epochs >= 0"
            )
        if self.sparsity < 0 or self.lr <= 0 or not 0.0 <= self.holdout < 1.0:
            raise GaterNetError(f"sparsity={self.sparsity}, lr={self.lr}, holdout={self.holdout}; "
                                "expected sparsity >= 0, lr > 0 and a holdout share in [0, 1)")
        rate = self.target_rate
        if (rate is not None and not 0.0 < rate <= 1.0) or not 0.0 <= self.off_below < 1.0:
            raise GaterNetError(f"target_rate={rate}, off_below={self.off_below}; expected a "
                                "target gate usage in (0, 1] and off_below in [0, 1)")
        if self.rate_weights not in RATE_WEIGHTS:
            raise GaterNetError(f"rate_weights={self.rate_weights!r}; expected one of "
                                f"{RATE_WEIGHTS}")


def fit_gaternet(
    backbone: nn.Module | str | Path | GaterNetFitConfig,
    data: str | Dataset | None = None,
    gated: Sequence[str] | None = None,
    **options: Any,
) -> GaterNetFit:
    """Attach a gater to a trained ``backbone``, gate its ``gated`` layers and train both.

    The gater's classifier is first pre-trained on ``data`` for ``gater_epochs`` epochs (the
    paper starts both networks pre-trained; 0 keeps it random), its output layer removed;
    then gater and a copy of the backbone are trained jointly for ``epochs`` epochs (SGD,
    Nesterov momentum, one-cycle schedule peaking at ``lr``, batch-norm in training mode,
    random crop + flip when ``augment``) on cross-entropy plus ``sparsity · mean(gates)``
    (the paper's L1 term) or, with a ``target_rate`` ``r``, plus ``sparsity · max(0, use − r)``
    where ``use = Σ_i w_i √(p_i)``: ``p_i`` is gate ``i``'s on-rate in the batch, ``w_i`` sum
    to 1 and are the FLOPs pruning its filter saves (:func:`gate_flops`; ``rate_weights=
    "flops"``) or equal (``"filters"``). The square root (a group-sparsity norm over the
    batch) pushes rarely-on gates hardest, towards always off, which pruning can remove; the
    hinge stops pushing once the usage is down to ``r``, so ``r`` sets how much is switched off;
    the gater learns at ``gater_lr_scale`` times ``lr`` (a few epochs must move its gates,
    while the backbone is already trained). ``gater_lr`` is the pre-training's peak rate.
    Every gate starts on, so training starts from the backbone's own predictions. Then the
    gates switched on for at most ``off_below`` of the training images are forced off for
    every input (:func:`force_off`), so the backbone learns without the filters pruning
    removes. Then, for
    ``settle_epochs``, the gater is frozen and the backbone alone is trained with the hard,
    noiseless gates of inference (a short run leaves many gate logits near 0, where the
    training noise switches them on and inference does not).
    ``holdout`` of ``data`` is kept out for the accuracies and the gate kinds reported.
    ``backbone``, ``arch``, ``trust_pickle``, ``normalization`` as in
    :func:`~dgconvert.gating.fit.fit_gates`.

    Called with a :class:`GaterNetFitConfig`, or with its fields as arguments.
    """
    if isinstance(backbone, GaterNetFitConfig):
        if data is not None or gated is not None or options:
            raise TypeError("fit_gaternet(GaterNetFitConfig(...)) takes no other arguments")
        cfg = backbone
    else:
        if data is None:
            raise TypeError("fit_gaternet needs data (a --data spec or a Dataset)")
        cfg = GaterNetFitConfig(backbone=backbone, data=data, gated=gated, **options)
    cfg.check()
    with torch_threads(cfg.threads):
        return _GaterNetFitting(cfg).run()


class _GaterNetFitting:
    """One :func:`fit_gaternet` run: the resolved inputs and the training phases."""

    def __init__(self, cfg: GaterNetFitConfig) -> None:
        self.cfg, self.t0 = cfg, time.perf_counter()
        model, self.arch, self.info = resolve_backbone(cfg.backbone, cfg.arch, cfg.trust_pickle)
        spec_in = self.info.get("input") or {}
        shape = list(cfg.input_shape or spec_in.get("shape") or [])
        self.normalization = (cfg.normalization if cfg.normalization is not None
                              else spec_in.get("normalization"))
        self.ds = ds = resolve_data(cfg.data)
        self.input_shape = shape or list(ds.sample_shape)
        if list(ds.sample_shape) != [int(s) for s in self.input_shape]:
            raise GaterNetError(f"{ds.source or 'the data'} has samples of shape "
                                f"{list(ds.sample_shape)}; the backbone expects {self.input_shape}")
        self.y_all = ds.require_labels("GaterNet fitting")
        self.train_idx, self.hold_idx = holdout_split(len(ds), cfg.holdout, cfg.seed)
        self.model = model
        self.losses: dict[str, float] = {}

    def run(self) -> GaterNetFit:
        cfg, ds, hold = self.cfg, self.ds, self.hold_idx
        base_acc = self._check_backbone()
        torch.manual_seed(cfg.seed)
        net = GaterNet.build(copy.deepcopy(self.model), cfg.gated, self._gater_spec(),
                             bottleneck=cfg.bottleneck, input_shape=self.input_shape,
                             num_classes=self.num_classes, arch=self.arch,
                             normalization=self.normalization,
                             classes=cfg.classes or self.info.get("classes") or ds.classes)
        for p in net.parameters():
            p.requires_grad_(True)
        self.batches = _Batches(ds.images, self.normalization, cfg.augment, cfg.seed)
        self.y, self.tr = torch.from_numpy(self.y_all), torch.from_numpy(self.train_idx)
        self.steps = math.ceil(len(self.train_idx) / cfg.batch_size)
        if cfg.gater_epochs:
            self._pretrain_gater(net)
        self._joint(net)
        net = self._fix_rare_gates_off(net)
        if cfg.settle_epochs:
            self._settle(net)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        acc, _ = _accuracy(net, ds.images[hold], self.y_all[hold], self.normalization)
        layers = distribution(net, filter_gate_counts(net, ds.images[hold]), len(hold)) if len(hold) else []
        result = GaterNetFit(net, base_acc if len(hold) else None, acc if len(hold) else None,
                             layers, self._options(net), self.losses,
                             time.perf_counter() - self.t0)
        net.fit_record = result.as_dict()
        return result

    def _gater_spec(self) -> dict[str, Any] | None:
        gater = self.cfg.gater
        return {"factory": gater, "kwargs": {}} if isinstance(gater, str) else gater

    def _check_backbone(self) -> float:
        """The backbone's held-out accuracy (near chance: stop, unless told not to check)."""
        model, hold, y_all = self.model, self.hold_idx, self.y_all
        model.eval()
        with torch.no_grad():
            self.num_classes = int(model(torch.zeros(2, *self.input_shape)).shape[1])
        if int(y_all.max()) >= self.num_classes or int(y_all.min()) < 0:
            raise GaterNetError(f"labels span {int(y_all.min())}..{int(y_all.max())}; the "
                                f"backbone has {self.num_classes} outputs")
        acc, logits = _accuracy(model, self.ds.images[hold], y_all[hold], self.normalization)
        if self.cfg.check_accuracy and len(hold):
            check_backbone_accuracy(logits, y_all[hold], normalization=self.normalization,
                                    source=self.ds.source or "the data")
        return acc

    def _phase(self, key: str, desc: str, epochs: int, params: Any, loss: Any, lr: float,
               decayed: list[nn.Module], seed: int) -> None:
        cfg = self.cfg
        bar = progress_bar(epochs * self.steps, desc if cfg.progress else False, key, "step")
        self.losses[key] = sgd(params, loss, len(self.train_idx), epochs, cfg.batch_size, lr,
                                cfg.weight_decay, decayed, seed, bar)
        bar.close()

    def _pretrain_gater(self, net: GaterNet) -> None:
        batches, y, tr = self.batches, self.y, self.tr
        clf = nn.Sequential(net.gater.extractor, nn.Flatten(1),
                            nn.Linear(net.gater.fc1.in_features, self.num_classes))
        clf.train()
        self._phase("gater_pretrain", "pre-train gater", self.cfg.gater_epochs,
                    list(clf.parameters()),
                    lambda i: nn.functional.cross_entropy(clf(batches(tr[i])), y[tr[i]]),
                    self.cfg.gater_lr, _decayed(clf), self.cfg.seed)

    def _joint(self, net: GaterNet) -> None:
        cfg, batches, y, tr = self.cfg, self.batches, self.y, self.tr
        target = cfg.target_rate or 0.0
        weights = None
        if cfg.target_rate is not None:
            w = gate_flops(net) if cfg.rate_weights == "flops" else np.ones(net.num_filter_gates)
            w = w if w.sum() > 0 else np.ones_like(w)
            weights = torch.from_numpy(w / w.sum()).float()
        net.train()
        sparse_terms: list[float] = []

        def joint_loss(i: torch.Tensor) -> torch.Tensor:
            x = batches(tr[i])
            g = net.gater(x)
            if weights is None:
                reg = term = g.mean()
            else:  # a gate's usage: sqrt of its on-rate in the batch (group sparsity)
                reg = torch.sqrt(g.mean(0) + _USAGE_EPS) @ weights
                term = torch.relu(reg - target)
            sparse_terms.append(float(reg.detach()))
            return nn.functional.cross_entropy(net.body(x, g), y[tr[i]]) + cfg.sparsity * term

        groups = [{"params": list(net.body.parameters())},
                  {"params": list(net.gater.parameters()), "lr": cfg.lr * cfg.gater_lr_scale}]
        self._phase("joint", "train GaterNet", cfg.epochs, groups, joint_loss, cfg.lr,
                    _decayed(net), cfg.seed + 1)
        self.losses["final_gate_mean"] = float(np.mean(sparse_terms[-self.steps:]))

    def _fix_rare_gates_off(self, net: GaterNet) -> GaterNet:
        """Gates on for at most ``off_below`` of the training images: off for every input."""
        counts = filter_gate_counts(net, self.ds.images[self.train_idx])
        fixed = counts <= self.cfg.off_below * len(self.train_idx)
        self.losses["fixed_off"] = int(fixed.sum())
        return force_off(net, fixed).train()  # filter_gate_counts left it in eval mode

    def _settle(self, net: GaterNet) -> None:
        batches, y, tr = self.batches, self.y, self.tr
        net.gater.eval()
        for p in net.gater.parameters():
            p.requires_grad_(False)

        def settle_loss(i: torch.Tensor) -> torch.Tensor:
            x = batches(tr[i])
            return nn.functional.cross_entropy(net.body(x, net.hard_gates(x)), y[tr[i]])

        self._phase("settle", "settle backbone", self.cfg.settle_epochs,
                    list(net.body.parameters()), settle_loss, self.cfg.lr,
                    _decayed(net.body), self.cfg.seed + 2)

    def _options(self, net: GaterNet) -> dict[str, Any]:
        cfg = self.cfg
        gater = {**(net.config.gater or {}), "bottleneck": net.config.bottleneck}
        keys = ("gater_epochs", "epochs", "batch_size", "lr", "gater_lr", "gater_lr_scale",
                "sparsity", "target_rate", "rate_weights", "off_below", "settle_epochs",
                "weight_decay", "augment", "seed")
        return {"gated": [lay.name for lay in net.layers], "gater": gater,
                **{k: getattr(cfg, k) for k in keys}, "data": self.ds.source,
                "train_samples": len(self.train_idx), "holdout_samples": len(self.hold_idx)}
