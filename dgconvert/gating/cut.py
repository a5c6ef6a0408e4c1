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

import inspect
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from dgconvert.core.errors import CutError

logger = logging.getLogger(__name__)


def _library_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """Modules and functions a model library registered as not fx-traceable (timm's
    ``register_notrace_module`` / ``register_notrace_function``), when it is imported."""
    fx_reg = sys.modules.get("timm.layers._fx")
    if fx_reg is None:
        return (), ()
    try:
        return tuple(fx_reg.get_notrace_modules()), tuple(fx_reg.get_notrace_functions())
    except Exception:  # another timm layout: trace without its registry
        return (), ()


class _CutTracer(fx.Tracer):
    """Treats the cut modules (and the usual torch.nn leaves, and modules a model library
    registered as not traceable) as opaque calls."""

    def __init__(self, leaves: Sequence[str]) -> None:
        self.notrace, functions = _library_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaves
            or isinstance(m, self.notrace)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _constant_args(model: nn.Module) -> dict[str, Any]:
    """Optional forward arguments after the image (e.g. ``attn_mask=None``): traced as their
    defaults, so they are constants rather than inputs crossing every cut."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _inline_constants(graph: fx.Graph, constants: dict[str, Any]) -> None:
    """Replace the placeholders of ``constants`` (traced as concrete arguments) by their
    values, so that the graph has one input, the image."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # fx may rename a concrete argument's placeholder (attn_mask -> attn_mask_1)
    for n in placeholders[1:]:
        name = next((c for c in constants if str(n.target).rstrip("_0123456789") == c
                     or str(n.target) == c), None)  # fmt: skip
        if name is None:
            continue
        value = constants[name]
        for user in list(n.users):
            user.args = fx.node.map_aggregate(user.args, lambda a, n=n, v=value: v if a is n else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a, n=n, v=value: v if a is n else a)
        if not n.users:
            graph.erase_node(n)


def trace_with_leaves(model: nn.Module, leaves: Sequence[str]) -> fx.GraphModule:
    constants = _constant_args(model)
    try:
        graph = _CutTracer(leaves).trace(model, concrete_args=constants or None)
        _inline_constants(graph, constants)
    except Exception as exc:  # fx raises many types for untraceable code
        raise CutError(
            f"could not trace {type(model).__name__} with torch.fx: {exc}. Expected a "
            "torch.fx-traceable classifier (no data-dependent Python control flow in "
            "forward). Fix: wrap untraceable parts in a module and name it as a cut, or "
            "build the GatedNetwork from explicit stages."
        ) from exc
    return fx.GraphModule(model, graph)


def crossing_values(nodes: list[fx.Node], pos: int, index: dict[fx.Node, int]) -> list[fx.Node]:
    """Values defined at or before ``pos`` and used after it (parameters excluded)."""
    return [
        n
        for n in nodes[: pos + 1]
        if n.op not in ("get_attr", "output") and any(index[u] > pos for u in n.users)
    ]


@dataclass
class CutPoint:
    """A module whose output is the only value crossing it: a place to end a stage."""

    name: str  # the outermost module ending at this value
    aliases: list[str] = field(default_factory=list)  # inner modules ending at the same value
    depth: int = 1  # 1 for a direct child of the model
    shape: list[int] | None = None  # output shape without the batch dim
    flops: int | None = None  # per-sample FLOPs of the model up to and including this module
    share: float | None = None  # flops / the whole model's FLOPs


def module_spans(nodes: list[fx.Node]) -> dict[str, list[int]]:
    """Module qualified name -> indices of the traced nodes executed inside it."""
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        stack = n.meta.get("nn_module_stack") or {}
        names = {v[0] if isinstance(v, tuple) else k for k, v in stack.items()}
        if n.op == "call_module":
            names.add(str(n.target))
        for name in names:
            if name:
                spans.setdefault(str(name), []).append(i)
    return spans


def _single_tensor_points(model: nn.Module) -> tuple[fx.GraphModule, list[CutPoint], list[int]]:
    """Trace ``model`` through every non-leaf module; every module whose nodes are
    contiguous and whose last node is the only value crossing it is a cut point."""
    gm = trace_with_leaves(model, [])
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    out_node = next(n for n in nodes if n.op == "output")
    result = out_node.args[0]
    order = {name: i for i, (name, _) in enumerate(model.named_modules()) if name}
    spans = module_spans(nodes)
    by_node: dict[int, list[str]] = {}
    for name in sorted(spans, key=lambda n: order.get(n, len(order))):
        if name not in order:
            continue
        idx = spans[name]
        first, last = idx[0], idx[-1]
        inside = set(idx)
        if any(j not in inside and nodes[j].op != "get_attr" for j in range(first, last + 1)):
            continue  # called twice, or interleaved with code outside it
        end = nodes[last]
        if end is result or end.op in ("get_attr", "placeholder", "output") or not end.users:
            continue
        if nodes[last + 1].op == "output" or crossing_values(nodes, last, index) != [end]:
            continue
        by_node.setdefault(last, []).append(name)
    points = []
    positions = []
    for pos in sorted(by_node):
        names = by_node[pos]
        points.append(CutPoint(names[0], names[1:], names[0].count(".") + 1))
        positions.append(pos)
    return gm, points, positions


def valid_cut_points(model: nn.Module, *, nested: bool = True) -> list[str]:
    """Names of the modules whose outputs are single-tensor cuts, in execution order.

    ``nested=False``: direct children only. Torch's own layers (``Conv2d``, ``ReLU``, …)
    count only as direct children; :func:`cut_points` lists them all with sizes and FLOPs.
    """
    _, points, _ = _single_tensor_points(model)
    names = []
    modules = dict(model.named_modules())
    for p in points:
        for name in [p.name, *p.aliases]:
            if ("." not in name or nested) and _listed(modules, name):
                names.append(name)
                break
    return names


def _listed(modules: dict[str, nn.Module], name: str) -> bool:
    """Shown by default: any module but torch's own layers nested below a block (a torch
    layer counts when it is a direct child of the model or an entry of a top-level
    ``nn.Sequential``, e.g. a stem convolution in ``features``)."""
    parent = name.rpartition(".")[0]
    if not parent or not fx.Tracer().is_leaf_module(modules[name], name):
        return True
    return "." not in parent and isinstance(modules[parent], nn.Sequential)


class _Recorder(fx.Interpreter):
    """Runs the traced graph, recording each node's output shape and cumulative FLOPs."""

    def __init__(self, gm: fx.GraphModule, counter: Any) -> None:
        super().__init__(gm)
        self.counter = counter
        self.shapes: list[list[int] | None] = []
        self.flops: list[int] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes.append(list(out.shape) if isinstance(out, torch.Tensor) else None)
        self.flops.append(int(self.counter.get_total_flops()))
        return out


@torch.no_grad()
def cut_points(
    model: nn.Module, example_input: torch.Tensor, *, all_modules: bool = False
) -> tuple[list[CutPoint], int]:
    """Every single-tensor cut point of ``model`` with its output shape and the cumulative
    per-sample FLOPs share up to it, in execution order; and the model's total FLOPs.

    ``example_input``: a sample with its batch dim (``[1, C, H, W]``; the first is used).
    A value whose dim 0 is not the batch is no cut point. Torch's own layers
    (``Conv2d``, ``ReLU``, …) below the top level are left out unless ``all_modules``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        gm, points, positions = _single_tensor_points(model)
        # two samples: a value whose dim 0 is not the batch (windows or heads folded into
        # it, sequence-first tensors) cannot be gathered by row, so it is no cut point
        pair = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        with FlopCounterMode(display=False) as counter:
            rec = _Recorder(gm, counter)
            rec.run(pair)
    finally:
        model.train(was)
    flops = [f // 2 for f in rec.flops]
    total = max(flops[-1] if flops else 0, 1)
    modules = dict(model.named_modules())
    kept = []
    for p, pos in zip(points, positions, strict=True):
        names = [p.name, *p.aliases]
        if not all_modules:
            names = [n for n in names if _listed(modules, n)]
        shape = rec.shapes[pos]
        if not names or shape is None or len(shape) < 2 or shape[0] != 2:
            continue
        kept.append(
            CutPoint(names[0], names[1:], names[0].count(".") + 1, shape[1:],
                     flops[pos], flops[pos] / total)  # fmt: skip
        )
    return kept, total


def pick_cuts(points: Sequence[CutPoint], k: int, shares: Sequence[float] | None = None) -> list[CutPoint]:
    """``k`` of ``points`` (in execution order) whose FLOPs shares lie closest to ``shares``
    (default: equal stages, ``1/(k+1), 2/(k+1), …``), by least squared distance."""
    if k < 1:
        raise CutError(f"asked for {k} automatic cut points; expected at least 1")
    targets = [float(s) for s in shares] if shares is not None else [(j + 1) / (k + 1) for j in range(k)]
    if len(targets) != k or any(not 0 < t < 1 for t in targets) or targets != sorted(set(targets)):
        raise CutError(
            f"got FLOPs shares {targets} for {k} cuts; expected {k} increasing shares "
            "strictly between 0 and 1, e.g. 0.25,0.5,0.75"
        )
    cand = [p for p in points if p.share is not None and 0 < p.share < 1]
    if len(cand) < k:
        raise CutError(
            f"the model has {len(cand)} single-tensor cut points with compute on both sides "
            f"({[p.name for p in cand]}); {k} were asked for. Fix: ask for fewer cuts."
        )
    n, inf = len(cand), float("inf")
    # cost[j][i]: best total for targets[:j+1] with target j at candidate i; a stage must
    # add FLOPs, so consecutive picks need strictly larger shares
    cost = [[inf] * n for _ in range(k)]
    back = [[-1] * n for _ in range(k)]
    for i in range(n):
        cost[0][i] = (cand[i].share - targets[0]) ** 2  # type: ignore[operator]
    for j in range(1, k):
        for i in range(n):
            prev = [p for p in range(i) if cand[p].share < cand[i].share and cost[j - 1][p] < inf]  # type: ignore[operator]
            if prev:
                best = min(prev, key=lambda p: cost[j - 1][p])
                cost[j][i] = cost[j - 1][best] + (cand[i].share - targets[j]) ** 2  # type: ignore[operator]
                back[j][i] = best
    i = min(range(n), key=lambda c: cost[k - 1][c])
    if cost[k - 1][i] == inf:
        raise CutError(
            f"the model has fewer than {k} cut points with distinct FLOPs shares "
            f"({sorted({round(p.share or 0, 3) for p in cand})}). Fix: ask for fewer cuts."
        )
    chosen = [i]
    for j in range(k - 1, 0, -1):
        i = back[j][i]
        chosen.append(i)
    return [cand[c] for c in reversed(chosen)]


def auto_cuts(
    model: nn.Module, k: int, example_input: torch.Tensor, *, shares: Sequence[float] | None = None
) -> list[str]:
    """Names of ``k`` single-tensor cut points at about equal FLOPs shares (or ``shares``),
    preferring block boundaries (shallow modules) to points deep inside blocks."""
    points, _ = cut_points(model, example_input)
    if sum(1 for p in points if 0 < (p.share or 0) < 1) < k:  # torch's own layers too
        points, _ = cut_points(model, example_input, all_modules=True)
    for _ in range(len(points)):
        chosen = _pick_coarse(points, k, shares)
        picked = _names(chosen)
        try:
            cut_backbone(model, picked)
            return picked
        except CutError as exc:
            logger.info("automatic cuts %s refused (%s); trying others", picked, exc)
        bad = []
        for p, name in zip(chosen, picked, strict=True):
            try:
                cut_backbone(model, [name])
            except CutError:
                bad.append(p.name)
        # the points work alone but not together: drop the innermost of the pair
        points = [p for p in points if p.name not in (bad or [chosen[0].name])]
    raise CutError(f"found no {k} usable cut points in {type(model).__name__}")


def _pick_coarse(points: Sequence[CutPoint], k: int, shares: Sequence[float] | None) -> list[CutPoint]:
    """:func:`pick_cuts` among the shallowest points that fit: block boundaries (depth 1,
    then 2, …) are preferred to points deep inside a block, as long as their largest
    distance to a target share exceeds the best pick's by at most ``1 / (4 (k + 1))``."""
    targets = list(shares) if shares is not None else [(j + 1) / (k + 1) for j in range(k)]

    def worst(picked: list[CutPoint]) -> float:
        return max(abs((p.share or 0) - t) for p, t in zip(picked, targets, strict=True))

    best = pick_cuts(points, k, shares)
    allowed = worst(best) + 0.25 / (k + 1)
    for depth in sorted({p.depth for p in points}):
        try:
            picked = pick_cuts([p for p in points if p.depth <= depth], k, shares)
        except CutError:
            continue
        if worst(picked) <= allowed:
            return picked
    return best


def _names(points: Sequence[CutPoint]) -> list[str]:
    """A module name per point that contains none of the other points' modules (a cut
    module is traced as one call, so another cut cannot lie inside it)."""
    names: list[str] = []
    for i, p in enumerate(points):
        others = [n for j, q in enumerate(points) if j != i for n in (q.name, *q.aliases)]
        options = [p.name, *p.aliases]
        fit = [n for n in options if not any(o.startswith(n + ".") for o in others)]
        names.append(fit[0] if fit else options[-1])
    return names


def extract_subgraph(gm: fx.GraphModule, start: fx.Node, nodes: Iterable[fx.Node],
                     outputs: Callable[[fx.Graph, Callable[[fx.Node], fx.Node]], Any],
                     ) -> fx.GraphModule:
    """A GraphModule taking ``start``'s value as its one input ``x`` and computing the copies
    of ``nodes`` (in order); ``outputs(graph, lookup)`` gives its output from the copies.
    Parameters and buffers are copied where used; any other value from before ``start`` is
    a cut error."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise CutError(f"internal: value {a.name} is used across a cut")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        if n is not start:
            env[n] = graph.node_copy(n, lookup)
    graph.output(outputs(graph, lookup))
    graph.lint()
    return fx.GraphModule(gm, graph)


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node, end: fx.Node) -> fx.GraphModule:
    """A GraphModule computing ``end`` from ``start`` using the nodes strictly after start."""
    body = nodes[nodes.index(start) + 1 : nodes.index(end) + 1]
    return extract_subgraph(gm, start, body, lambda _graph, lookup: lookup(end))


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
    gm = trace_with_leaves(model, cuts)
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
        crossing = crossing_values(nodes, index[n], index)
        if crossing != [n]:
            names = [x.name for x in crossing]
            raise CutError(
                f"cutting at {c!r} would carry {len(crossing)} tensors across the stage boundary "
                f"({names}): a skip connection jumps over this point. Stage boundaries must be "
                f"crossed by one tensor only. Fix: cut at a block boundary; single-tensor cuts "
                f"of this model: {_suggest(model)}."
            )
        if n is result:
            raise CutError(f"cut point {c!r} is the model's output; nothing would remain after it")
    bounds = [placeholders[0], *cut_nodes, result]
    return [_subgraph(gm, nodes, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _suggest(model: nn.Module, limit: int = 16) -> str:
    try:
        names = valid_cut_points(model)
    except CutError:
        return "none found (the model does not trace through its blocks)"
    if not names:
        return "none"
    more = f" … ({len(names) - limit} more; `dgconvert cuts MODEL` lists them all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
