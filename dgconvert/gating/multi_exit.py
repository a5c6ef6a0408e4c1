"""Split a multi-exit model trained elsewhere (SDN, BranchyNet, MSDNet, EENets style) into
stages and gates, keeping its own exit heads.

Such a model's ``forward`` returns a list: one entry per exit, the last the final classifier;
an entry is the logits ``[N, C]`` or a tuple ``(logits, confidence, ...)`` (EENets). Each
named exit head reads one intermediate tensor of the trunk: we find it with ``torch.fx``,
cut the trunk there (a single-tensor cut, as in :mod:`dgconvert.gating.cut`), and fuse the
head (its own modules, weights and ops, up to the returned entry) as the gate of its stage,
scored by an ``exit-head`` score rule (:data:`dgconvert.core.gates.EXIT_SCORES`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from dgconvert.core.errors import CutError
from dgconvert.core.gates import EXIT_HEAD, EXIT_SCORES, GATE_KINDS
from dgconvert.gating.cut import extract_subgraph, trace_with_leaves
from dgconvert.gating.heads import GateHead, top2_gap

# (node, index into its tuple value or None): where an output entry's tensor comes from
_Ref = tuple[fx.Node, int | None]


def exit_score(logits: torch.Tensor, confidence: torch.Tensor | None, score: str) -> torch.Tensor:
    """The ``exit-head`` score rule in torch (see :func:`dgconvert.core.gates.exit_head_score`)."""
    if score == "confidence":
        if confidence is None:
            raise ValueError("score='confidence' needs the exit's confidence output; got none")
        return confidence.float().flatten()
    z = logits.float()
    if score == "margin-logits":
        return top2_gap(z)
    p = torch.softmax(z, dim=1)
    if score == "max-softmax":
        return p.max(dim=1).values
    if score == "margin-softmax":
        return top2_gap(p)
    if score == "neg-entropy":
        return (p * torch.log_softmax(z, dim=1)).sum(dim=1)
    GATE_KINDS[EXIT_HEAD].check_score(score)  # an unknown score: GateKindError
    raise AssertionError(f"exit score {score!r} has no torch rule")


class ExitHeadGate(GateHead):
    """A multi-exit model's own exit head as a gate: ``head(features)`` returns
    ``(logits,)`` or ``(logits, confidence)``; score by the ``exit-head`` rule ``score``."""

    gate_type = EXIT_HEAD

    def __init__(self, head: nn.Module, in_features: int, num_classes: int, score: str,
                 name: str, has_confidence: bool) -> None:
        super().__init__(in_features, num_classes, score)
        self.head = head
        self.exit_name = name
        self.has_confidence = has_confidence

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(features)
        logits = out[0]
        score = exit_score(logits, out[1] if self.has_confidence else None, self.score_kind)
        return score, logits.argmax(dim=1), logits

    def spec(self) -> dict[str, Any]:
        """The gate spec plus the exit head's module name and whether it has a confidence."""
        return {**super().spec(), "exit": self.exit_name, "confidence": self.has_confidence}


@dataclass
class MultiExitParts:
    """What :func:`split_multi_exit` found: stage bodies, exit gates, where each exit's
    entry sits in the model's output list (the final classifier's last)."""

    stages: list[fx.GraphModule]
    gates: list[ExitHeadGate]
    num_classes: int
    exits: list[str]
    outputs: list[int]


def _entries(out: Any, name: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(logits, confidence or None)`` of every entry of a multi-exit model's output."""
    if not isinstance(out, list | tuple) or len(out) < 2:
        raise CutError(
            f"{name}.forward returns {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, list | tuple) else "")
            + "; expected a list with one entry per exit, the final classifier's last "
            "(each entry logits [N, C] or a tuple (logits, confidence)). Fix: for a "
            "single-exit classifier use GatedNetwork.from_backbone."
        )
    found = []
    for i, e in enumerate(out):
        if isinstance(e, torch.Tensor):
            logits, conf = e, None
        elif isinstance(e, list | tuple) and e and all(isinstance(t, torch.Tensor) for t in e):
            logits, conf = e[0], (e[1] if len(e) > 1 else None)
        else:
            raise CutError(
                f"entry {i} of {name}.forward's output is {type(e).__name__}; expected logits "
                "[N, C] or a tuple of tensors (logits, confidence)."
            )
        if logits.dim() != 2:
            raise CutError(
                f"entry {i} of {name}.forward's output has logits of shape "
                f"{tuple(logits.shape)}; expected [N, num_classes]."
            )
        found.append((logits, conf))
    return found


def own_exit_outputs(model: nn.Module, x: torch.Tensor, outputs: Sequence[int]
                     ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The model's own ``(logits, confidence or None)`` of the exits at ``outputs``
    (indices into its output list), as numpy, from an ordinary forward call."""
    with torch.no_grad():
        entries = _entries(model(x), type(model).__name__)
    return [(entries[i][0].float().numpy(),
             None if entries[i][1] is None else entries[i][1].float().numpy())
            for i in outputs]


def _flat_nodes(arg: Any) -> list[fx.Node]:
    if isinstance(arg, fx.Node):
        return [arg]
    if isinstance(arg, list | tuple):
        return [n for a in arg for n in _flat_nodes(a)]
    return []


def _refs(arg: Any, value: Any) -> tuple[_Ref, _Ref | None]:
    """Where an output entry's logits and confidence come from in the graph."""
    if isinstance(arg, fx.Node):
        if isinstance(value, torch.Tensor):
            return (arg, None), None
        return (arg, 0), ((arg, 1) if len(value) > 1 else None)
    if isinstance(arg, list | tuple) and arg and isinstance(arg[0], fx.Node):
        conf = (arg[1], None) if len(arg) > 1 and isinstance(arg[1], fx.Node) else None
        return (arg[0], None), conf
    raise CutError(f"cannot follow output entry {arg!r} through the traced graph")


def _ancestors(roots: Sequence[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _copy(gm: fx.GraphModule, keep: list[fx.Node], start: fx.Node, outs: Sequence[_Ref],
          single: bool) -> fx.GraphModule:
    """A GraphModule computing ``outs`` from ``start`` with the nodes ``keep`` (in order)."""

    def outputs(graph: fx.Graph, lookup: Callable[[fx.Node], fx.Node]) -> Any:
        vals = [lookup(n) if i is None else graph.call_function(operator.getitem, (lookup(n), i))
                for n, i in outs]
        return vals[0] if single else tuple(vals)

    return extract_subgraph(gm, start, keep, outputs)


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # the model's own code may raise anything
        raise CutError(
            f"{type(model).__name__} failed on example_input of shape {tuple(x.shape)}: {exc}. "
            "Expected an input the model accepts. Fix: pass example_input (or input_shape) "
            "of the model's input size."
        ) from exc


@dataclass
class _Traced:
    """A multi-exit model traced with its exit heads as leaves, and what its output holds."""

    name: str
    gm: fx.GraphModule
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    placeholder: fx.Node
    result: Sequence[Any]
    values: list[tuple[torch.Tensor, torch.Tensor | None]]
    refs: list[tuple[_Ref, _Ref | None]]
    final: _Ref
    trunk: set[fx.Node]
    entry_nodes: list[set[fx.Node]]


def split_multi_exit(
    model: nn.Module, exits: Sequence[str], score: str, example_input: torch.Tensor
) -> MultiExitParts:
    """Cut ``model`` where each named exit head reads the trunk; one gate per exit head.

    ``exits`` names the early exits' head modules in execution order (the final classifier
    may be named last too; it is the last stage, not a gate). Raises :class:`CutError`
    saying what was found, what was expected and the fix.
    """
    exits = _check_names(model, exits, score)
    t = _trace(model, exits, example_input)
    exits, outputs = _exit_entries(t, exits)
    regions, cuts = _exit_regions(t, exits, outputs)
    trunk_nodes = [n for n in t.nodes if n in t.trunk]
    _check_boundaries(t, exits, cuts, trunk_nodes)
    bounds = [t.placeholder, *cuts]
    ends: list[_Ref] = [(c, None) for c in cuts] + [t.final]
    stages = []
    for a, (b, i) in zip(bounds, ends, strict=True):
        need = _ancestors([b])
        keep = [n for n in trunk_nodes if n in need and t.index[n] > t.index[a]]
        stages.append(_copy(t.gm, keep, a, [(b, i)], single=True))
    gates = _exit_gates(t, exits, outputs, cuts, regions, stages, score, example_input)
    return MultiExitParts(stages, gates, int(t.values[-1][0].shape[1]), exits,
                          [*outputs, len(t.result) - 1])


def _check_names(model: nn.Module, exits: Sequence[str], score: str) -> list[str]:
    name = type(model).__name__
    GATE_KINDS[EXIT_HEAD].check_score(score)
    exits = list(exits)
    if not exits or not all(isinstance(e, str) and e for e in exits):
        raise CutError(f"exits={exits!r}; expected the names of the exit-head sub-modules, "
                       "e.g. ['exit1', 'exit2']")
    if len(set(exits)) != len(exits):
        raise CutError(f"exits repeat: {exits}; expected distinct module names")
    modules = dict(model.named_modules())
    unknown = [e for e in exits if e not in modules or not e]
    if unknown:
        children = [n for n, _ in model.named_children()]
        raise CutError(f"exit(s) {unknown} are not modules of {name}; expected names from "
                       f"model.named_modules(), e.g. {children[:10]}.")
    return exits


def _trace(model: nn.Module, exits: list[str], example_input: torch.Tensor) -> _Traced:
    name = type(model).__name__
    was_training = model.training
    model.eval()  # run and trace the inference path (forward may branch on self.training)
    try:
        raw = _run(model, example_input)
        try:
            gm = trace_with_leaves(model, exits)
        except CutError as exc:
            raise CutError(f"{exc} (For a multi-exit model the exit heads are traced as "
                           "opaque calls; the trunk itself must be traceable.)") from exc
    finally:
        model.train(was_training)
    values = _entries(raw, name)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise CutError(f"{name}.forward takes {len(placeholders)} inputs; expected one image "
                       "tensor.")
    result = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(result, list | tuple) or len(result) != len(values):
        raise CutError(f"{name}.forward's traced output is {type(result).__name__}; expected a "
                       f"list of {len(values)} entries as returned at run time.")
    refs = [_refs(a, v) for a, v in zip(result, raw, strict=True)]
    final = refs[-1][0]
    trunk = _ancestors([final[0]])
    entry_nodes = [_ancestors(_flat_nodes(a)) for a in result]

    return _Traced(name, gm, nodes, index, placeholders[0], result, values, refs, final,
                   trunk, entry_nodes)


def _exit_entries(t: _Traced, exits: list[str]) -> tuple[list[str], list[int]]:
    """The early exits (the final classifier dropped if named) and the output entry each
    one feeds."""
    name, nodes, result, trunk, entry_nodes = t.name, t.nodes, t.result, t.trunk, t.entry_nodes
    calls = {}
    for e in exits:
        found = [n for n in nodes if n.op == "call_module" and n.target == e]
        if len(found) != 1:
            raise CutError(f"exit head {e!r} is called {len(found)} times in {name}.forward; "
                           "expected exactly once.")
        calls[e] = found[0]
    last = len(result) - 1
    if len(exits) == len(result) and calls[exits[-1]] in trunk:
        exits = exits[:-1]  # the final classifier named too: it is the last stage
    outputs = []
    for e in exits:
        fed = [i for i in range(last) if calls[e] in entry_nodes[i]]
        if calls[e] in trunk:
            raise CutError(
                f"{e!r} is on the path to the final classifier's output (entry {last}), so it "
                f"is part of the trunk, not an exit head. Expected the modules whose outputs "
                f"only feed early-exit entries of {name}.forward's list. Fix: name the exit "
                "heads (e.g. exit1, exit2), not the trunk blocks they read."
            )
        if len(fed) != 1:
            raise CutError(
                f"exit head {e!r} feeds {len(fed)} early-exit entries of {name}.forward's "
                f"output ({fed}); expected exactly one. Fix: name a module whose output is "
                "returned as one exit's logits."
            )
        outputs.append(fed[0])
    if len(set(outputs)) != len(outputs):
        raise CutError(f"exits {exits} feed output entries {outputs}; expected one exit head "
                       "per entry.")
    if not exits:
        raise CutError(f"no early exit among {list(calls)}; expected at least one exit head "
                       "before the final classifier.")

    return exits, outputs


def _exit_regions(t: _Traced, exits: list[str], outputs: list[int]
                  ) -> tuple[list[set[fx.Node]], list[fx.Node]]:
    """Each exit head's own nodes and the trunk tensor it reads (checked independent and
    in execution order)."""
    index, trunk, entry_nodes = t.index, t.trunk, t.entry_nodes
    regions, cuts = [], []
    for e, i in zip(exits, outputs, strict=True):
        region = entry_nodes[i] - trunk
        reads = sorted({a for n in region for a in n.all_input_nodes
                        if a in trunk and a.op != "get_attr"}, key=index.__getitem__)
        if len(reads) != 1:
            raise CutError(
                f"exit head {e!r} (entry {i}) reads {len(reads)} tensors of the trunk "
                f"({[a.name for a in reads]}); expected exactly one, the feature it classifies. "
                "Fix: wrap the exit's inputs and head in one module that reads a single tensor "
                "(e.g. concatenate inside the trunk), or drop this exit."
            )
        if reads[0].op == "placeholder":
            raise CutError(f"exit head {e!r} reads the model input itself; expected an "
                           "intermediate feature. Fix: drop this exit.")
        regions.append(region)
        cuts.append(reads[0])
    for a in range(len(exits)):
        for b in range(a + 1, len(exits)):
            if cuts[a] is cuts[b]:
                raise CutError(
                    f"exits {exits[a]!r} and {exits[b]!r} both read {cuts[a].name}; expected "
                    "each exit at a different depth (one stage between two gates). Fix: keep "
                    f"one of them, e.g. exits={[x for x in exits if x != exits[b]]}."
                )
            if regions[a] & regions[b]:
                raise CutError(f"exits {exits[a]!r} and {exits[b]!r} share computation; "
                               "expected independent exit heads.")
    order = sorted(range(len(exits)), key=lambda j: index[cuts[j]])
    if order != list(range(len(exits))):
        raise CutError(f"exits {exits} are out of execution order; expected "
                       f"{[exits[j] for j in order]} (thresholds follow this order).")
    return regions, cuts


def _check_boundaries(t: _Traced, exits: list[str], cuts: list[fx.Node],
                      trunk_nodes: list[fx.Node]) -> None:
    """Cutting the trunk at each exit carries exactly one tensor across."""
    index, trunk, final = t.index, t.trunk, t.final
    for e, c in zip(exits, cuts, strict=True):
        pos = index[c]
        crossing = [n for n in trunk_nodes if index[n] <= pos and n.op != "get_attr"
                    and any(u in trunk and index[u] > pos for u in n.users)]
        if crossing != [c]:
            raise CutError(
                f"exit head {e!r} reads {c.name}, but cutting the trunk there would carry "
                f"{len(crossing)} tensors across the stage boundary "
                f"({[n.name for n in crossing]}): a skip connection jumps over this point. "
                "Expected exit heads that read a block boundary. Fix: attach the exit after "
                "the residual block, or drop it."
            )
        if c is final[0]:
            raise CutError(f"exit head {e!r} reads the final classifier's output; expected an "
                           "intermediate feature.")



def _exit_gates(t: _Traced, exits: list[str], outputs: list[int], cuts: list[fx.Node],
                regions: list[set[fx.Node]], stages: list[fx.GraphModule], score: str,
                example_input: torch.Tensor) -> list[ExitHeadGate]:
    """One :class:`ExitHeadGate` per exit: its head's nodes copied out of the trace."""
    values, refs, nodes, gm = t.values, t.refs, t.nodes, t.gm
    num_classes = int(values[-1][0].shape[1])
    gates = []
    x = example_input
    with torch.no_grad():
        for k, (e, i, c) in enumerate(zip(exits, outputs, cuts, strict=True)):
            logits, conf = values[i]
            if logits.shape[1] != num_classes:
                raise CutError(f"exit {e!r} returns {logits.shape[1]} logits; the final "
                               f"classifier {num_classes}. Expected the same classes at "
                               "every exit.")
            if score == "confidence" and (conf is None or conf.numel() != len(logits)):
                got = "no confidence" if conf is None else f"shape {tuple(conf.shape)}"
                raise CutError(
                    f"score='confidence' needs every exit to return (logits, confidence "
                    f"[N] or [N, 1]); exit {e!r} returns {got}. Fix: choose another score, "
                    f"one of {[s for s in EXIT_SCORES if s != 'confidence']}."
                )
            log_ref, conf_ref = refs[i]
            keep = [n for n in nodes if n in regions[k]]
            head = _copy(gm, keep, c, [log_ref] + ([conf_ref] if conf_ref else []),
                         single=False)
            x = stages[k](x)
            gates.append(ExitHeadGate(head, int(x.shape[1]), num_classes, score, e,
                                      conf_ref is not None))
    return gates
