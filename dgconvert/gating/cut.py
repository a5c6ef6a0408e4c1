"""Cut a ``torch.fx``-traceable classifier into stages at the outputs of named modules.

A cut is valid when the named module's output is the *only* value that crosses it: every
later operation depends on earlier ones only through that tensor. When more than one
tensor crosses (a skip connection jumping over the cut), we refuse with a :class:`CutError`
that names the crossing tensors and lists the module boundaries that would work. We chose
refusal over carrying several tensors across a stage boundary: it keeps the stage-graph
contract to one activation per boundary (one buffer on the device, one ``Gather``), and
block boundaries of ResNets/DenseNets are always single-tensor cuts.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

from dgconvert.core.errors import CutError


class _CutTracer(fx.Tracer):
    """Treats the cut modules (and the usual torch.nn leaves) as opaque calls."""

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(
            m, module_qualified_name
        )


def _trace(model: nn.Module, leaves: Sequence[str]) -> fx.GraphModule:
    try:
        graph = _CutTracer(leaves).trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise CutError(
            f"could not trace {type(model).__name__} with torch.fx: {exc}. Expected a "
            "torch.fx-traceable classifier (no data-dependent Python control flow in "
            "forward). Fix: wrap untraceable parts in a module and name it as a cut, or "
            "build the GatedNetwork from explicit stages."
        ) from exc
    return fx.GraphModule(model, graph)


def _crossing(nodes: list[fx.Node], pos: int, index: dict[fx.Node, int]) -> list[fx.Node]:
    """Values defined at or before ``pos`` and used after it (parameters excluded)."""
    return [
        n
        for n in nodes[: pos + 1]
        if n.op not in ("get_attr", "output") and any(index[u] > pos for u in n.users)
    ]


def valid_cut_points(model: nn.Module) -> list[str]:
    """Names of the model's direct children whose outputs are single-tensor cuts."""
    children = [name for name, _ in model.named_children()]
    gm = _trace(model, children)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    valid = []
    for i, n in enumerate(nodes):
        if n.op == "call_module" and n.target in children and n.users:
            if _crossing(nodes, i, index) == [n] and nodes[i + 1].op != "output":
                valid.append(str(n.target))
    return valid


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node, end: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``end`` from ``start`` using the nodes strictly after start."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise CutError(f"internal: value {a.name} is used across a cut")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes[nodes.index(start) + 1 : nodes.index(end) + 1]:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[end])
    graph.lint()
    return fx.GraphModule(gm, graph)


def cut_backbone(model: nn.Module, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """Split ``model`` into ``len(cuts) + 1`` stage modules, each taking one tensor.

    Stage k computes from the output of cut k-1 (the model input for k = 0) to the output
    of cut k; the last stage ends with the model's output (the logits).
    """
    if not cuts:
        raise CutError("no cut points given; expected at least one module name, e.g. layer1")
    modules = dict(model.named_modules())
    unknown = [c for c in cuts if c not in modules]
    if unknown:
        raise CutError(
            f"cut point(s) {unknown} are not modules of {type(model).__name__}; expected names "
            f"from model.named_modules(), e.g. {[n for n, _ in model.named_children()][:8]}."
        )
    if len(set(cuts)) != len(cuts):
        raise CutError(f"cut points repeat: {list(cuts)}; expected distinct module names")
    gm = _trace(model, cuts)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise CutError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs "
            f"({[p.name for p in placeholders]}); expected exactly one image tensor."
        )
    out_node = next(n for n in nodes if n.op == "output")
    result = out_node.args[0]
    if not isinstance(result, fx.Node):
        raise CutError(
            f"{type(model).__name__}.forward returns {type(result).__name__}; expected a single "
            "logits tensor [N, num_classes]. Fix: wrap the model so forward returns the logits."
        )
    cut_nodes = []
    for c in cuts:
        calls = [n for n in nodes if n.op == "call_module" and n.target == c]
        if len(calls) != 1:
            raise CutError(
                f"module {c!r} is called {len(calls)} times in forward; expected exactly once "
                "so that its output marks one point of the computation."
            )
        cut_nodes.append(calls[0])
    positions = [index[n] for n in cut_nodes]
    if positions != sorted(positions):
        order = [c for _, c in sorted(zip(positions, cuts, strict=True))]
        raise CutError(f"cut points {list(cuts)} are out of execution order; expected {order}")
    for c, n in zip(cuts, cut_nodes, strict=True):
        crossing = _crossing(nodes, index[n], index)
        if crossing != [n]:
            names = [x.name for x in crossing]
            raise CutError(
                f"cutting at {c!r} would carry {len(crossing)} tensors across the stage boundary "
                f"({names}): a skip connection jumps over this point. Stage boundaries must be "
                f"crossed by one tensor only. Fix: cut at a block boundary; single-tensor cuts "
                f"of this model: {valid_cut_points(model) or 'none among its direct children'}."
            )
        if n is result:
            raise CutError(f"cut point {c!r} is the model's output; nothing would remain after it")
    bounds = [placeholders[0], *cut_nodes, result]
    return [_subgraph(gm, nodes, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
