"""GaterNet + d-gates: early exits on a GaterNet without changing the stage contract.

The gater runs once, in stage 0. Later stages still need its gates, and only one tensor
(``features``) crosses a stage boundary, so each stage but the last returns its feature map
and the gates *packed* into one 2-D tensor ``[N, C·H·W + G]`` (the flattened map, then the
G gates); the next stage's graph gathers the continuing rows of that tensor, as every stage
graph does, and unpacks it. Gate heads (:class:`PackedGate`) pool the unpacked map, so a
d-gate sees exactly what it would see after that block. The cost of carrying the gates is
G floats per sample per boundary.

:func:`gaternet_exits` builds the :class:`~dgconvert.gating.network.GatedNetwork` (export,
verification, calibration and the runtime then treat it as any other);
:func:`fit_gaternet_exits` fits its d-gates with :mod:`dgconvert.gating.fit`'s loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from dgconvert.core.gates import DEFAULT_GATE, DEFAULT_HINGE, gate_kind
from dgconvert.gating.configs import GaterNetExitsConfig
from dgconvert.gating.cut import CutError, crossing_values, module_spans
from dgconvert.gating.fit import (
    FitResult,
    exit_costs,
    extract_features,
    gate_reports,
    holdout_split,
    resolve_data,
    train_heads,
)
from dgconvert.gating.gaternet import Gater, GaterNet, GaterNetError
from dgconvert.gating.heads import GateHead, make_gate
from dgconvert.gating.network import GatedNetwork

if TYPE_CHECKING:
    from dgconvert.data import Dataset


def pack(features: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` and ``[N, G]`` -> ``[N, C·H·W + G]``."""
    return torch.cat([features.flatten(1), gates], dim=1)


def unpack(packed: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack` for a feature map of per-sample ``shape``."""
    size = int(np.prod(shape))
    return packed[:, :size].reshape(-1, *shape), packed[:, size:]


class PackedGate(nn.Module):
    """A gate head reading packed stage outputs: pools the unpacked feature map. Already
    pooled vectors (``[N, in_features]``, as gate fitting caches them) pass through."""

    def __init__(self, head: GateHead, shape: Sequence[int]) -> None:
        super().__init__()
        self.head = head
        self.shape = [int(s) for s in shape]
        self.gate_type, self.score_kind = head.gate_type, head.score_kind
        self.in_features, self.num_classes = head.in_features, head.num_classes
        self.layout = getattr(head, "layout", "nchw")

    def input_linears(self) -> list[nn.Linear]:
        return self.head.input_linears()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[1] == self.in_features:
            return x
        return self.head.pool(unpack(x, self.shape)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head(self.pool(x))

    def spec(self) -> dict[str, Any]:
        return {**self.head.spec(), "packed": {"features": self.shape, "carries": "gaternet gates"}}


class GaterNetExitStage(nn.Module):
    """One stage: stage 0 runs the gater on the images; later stages unpack their input.
    Every stage but the last packs its output with the gates."""

    def __init__(self, part: fx.GraphModule, gater: Gater | None,
                 in_shape: Sequence[int] | None, out_shape: Sequence[int] | None) -> None:
        super().__init__()
        self.part, self.gater = part, gater
        self.in_shape = None if in_shape is None else [int(s) for s in in_shape]
        self.out_shape = None if out_shape is None else [int(s) for s in out_shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gater is not None:
            f, g = x, self.gater(x)
        else:
            assert self.in_shape is not None
            f, g = unpack(x, self.in_shape)
        y = self.part(f, g)
        return y if self.out_shape is None else pack(y, g)


def _parts(body: fx.GraphModule, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """Split the gated body ``(x, gates) -> logits`` after each cut module into parts
    ``(features, gates) -> features`` (the last: ``-> logits``)."""
    nodes = list(body.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    spans = module_spans(nodes)
    x_node, gates_node = (n for n in nodes if n.op == "placeholder")
    ends = []
    for cut in cuts:
        if cut not in spans:
            raise CutError(f"cut {cut!r} is not a module the GaterNet's backbone runs; expected "
                           "names such as layer1, layer2")
        end = spans[cut][-1]
        crossing = [n for n in crossing_values(nodes, end, index) if n is not gates_node]
        if crossing != [nodes[end]]:
            raise CutError(f"cut {cut!r}: {[n.name for n in crossing]} cross it; expected one "
                           "feature tensor (and the gates)")
        ends.append(end)
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        raise CutError(f"cuts {list(cuts)} are not in execution order")
    out = next(n for n in nodes if n.op == "output")
    parts, start = [], x_node
    for end in [*ends, None]:
        lo = index[start] + 1
        hi = end + 1 if end is not None else index[out]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {start: graph.placeholder("x"),
                                       gates_node: graph.placeholder("gates")}

        def lookup(a: fx.Node, env: dict[fx.Node, fx.Node] = env,
                   graph: fx.Graph = graph) -> fx.Node:
            if a not in env:
                if a.op != "get_attr":
                    raise CutError(f"internal: value {a.name} is used across a cut")
                env[a] = graph.node_copy(a, lookup)
            return env[a]

        for n in nodes[lo:hi]:
            if n.op != "placeholder":
                env[n] = graph.node_copy(n, lookup)
        result = nodes[end] if end is not None else out.args[0]
        graph.output(lookup(result) if isinstance(result, fx.Node) else result)
        graph.lint()
        parts.append(fx.GraphModule(body, graph))
        if end is not None:
            start = nodes[end]
    return parts


def gaternet_exits(net: GaterNet, cuts: Sequence[str], gate: str = DEFAULT_GATE,
                   score: str | None = None) -> GatedNetwork:
    """A :class:`GatedNetwork` running ``net`` (pruned or not) in stages cut after the
    ``cuts`` modules, with an (unfitted) ``gate`` head after each; the gater runs in stage 0
    and its gates travel packed with the features (see the module docstring)."""
    if not cuts:
        raise GaterNetError("GaterNet + d-gates needs at least one cut, e.g. layer1,layer2")
    net.eval()
    parts = _parts(net.body, list(cuts))
    shapes: list[list[int]] = []
    with torch.no_grad():
        x = torch.zeros(2, *net.input_shape)
        g = net.hard_gates(x)
        for part in parts[:-1]:
            x = part(x, g)
            if x.dim() != 4:
                raise GaterNetError(f"features after a cut have shape {list(x.shape)}; packing "
                                    "expects NCHW feature maps")
            shapes.append(list(x.shape[1:]))
    stages = [GaterNetExitStage(p, net.gater if k == 0 else None, shapes[k - 1] if k else None,
                            shapes[k] if k < len(shapes) else None)
              for k, p in enumerate(parts)]
    spec = {"type": gate, "score": gate_kind(gate).check_score(score), "layout": "nchw"}
    heads = [PackedGate(make_gate(spec, s[0], net.num_classes), s) for s in shapes]
    config = GaterNetExitsConfig(
        cuts=list(cuts), gate=gate, score=spec["score"], gaternet=net.config,
        pruned=net.pruned, gated=[lay.name for lay in net.layers],
        num_filter_gates=net.num_filter_gates, input_shape=net.input_shape,
        num_classes=net.num_classes, normalization=net.normalization, classes=net.classes,
        arch=net.config.arch)
    return GatedNetwork(stages, heads, net.num_classes, input_shape=net.input_shape,  # type: ignore[arg-type]
                        normalization=net.normalization, classes=net.classes,
                        family="gaternet-exits", config=config, backbone=net).eval()


def fit_gaternet_exits(
    net: GaterNet,
    data: str | Dataset,
    cuts: Sequence[str] = ("layer1", "layer2", "layer3"),
    gate: str = DEFAULT_GATE,
    *,
    score: str | None = None,
    hinge: str = DEFAULT_HINGE,
    l2: float | None = None,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 0.2,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Attach ``gate`` heads after ``cuts`` of a trained (possibly pruned) GaterNet and fit
    them on its frozen features, as ``dgconvert gates fit`` does on a backbone (standardized
    features, initial thresholds from the held-out share; ``l2`` defaults to the gate kind's)."""
    t0 = time.perf_counter()
    gnet = gaternet_exits(net, cuts, gate, score)
    l2 = gate_kind(gate).l2 if l2 is None else float(l2)
    ds = resolve_data(data)
    y_all = ds.require_labels("d-gate fitting")
    train_idx, hold_idx = holdout_split(len(ds), holdout, seed)
    feats = extract_features(gnet, ds.images, net.normalization, progress=progress)
    y = torch.from_numpy(y_all)
    tr = torch.from_numpy(train_idx)
    losses = train_heads(list(gnet.gates), feats.subset(tr), y[tr], hinge=hinge, l2=l2,  # type: ignore[arg-type]
                         epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    reports, final_acc = gate_reports(gnet, list(cuts), feats.subset(torch.from_numpy(hold_idx)),
                                  y_all[hold_idx], losses)
    gnet.thresholds = [r.threshold for r in reports]
    options = {"gate": gate, "score": gnet.gates[0].score_kind, "hinge": hinge, "l2": l2,
               "epochs": epochs, "lr": lr, "cuts": list(cuts), "data": ds.source,
               "train_samples": len(train_idx), "holdout_samples": len(hold_idx)}
    result = FitResult(gnet, reports, final_acc, exit_costs(gnet), options,
                       time.perf_counter() - t0)
    gnet.fit_record = result.as_dict()
    return result
