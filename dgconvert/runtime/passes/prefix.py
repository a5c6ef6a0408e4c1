"""Graph pass: the ungated prefixes of a bundle's model, for the physical limit of early exit.

A sample that exits at gate ``k`` must at least pay the full model's computation up to cut
``k``; nothing more is physically needed (no gate head, no compaction copy, no extra call).
:func:`prefix_graphs` builds, from the bundle's own stage graphs, one graph per exit point:
prefix ``k < K`` runs the bodies of stages ``0..k`` back to back (each stage's ``Gather`` and
gate head removed), prefix ``K`` is ``full.onnx``. Timing prefix ``k`` on full batches gives
what an exit at ``k`` costs at the limit; ``sum_k exits[k] * t_prefix[k]`` is the ideal time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dgconvert.core.contract import CONTRACT
from dgconvert.runtime.passes.graph_edit import live_nodes, model_of, remove_gather


class PrefixError(Exception):
    """The stage graphs are not in the shape the pass expects."""


def body_graph(model: Any, k: int) -> Any:
    """Stage ``k``'s body alone: input ``images`` (k = 0) or ``x`` (rows not gathered),
    output ``features``; the ``Gather`` by ``keep`` and the gate head removed."""
    import onnx
    from onnx import helper

    g = model.graph
    if CONTRACT.features not in {o.name for o in g.output}:
        raise PrefixError(f"stage {k} graph has no {CONTRACT.features!r} output (the last stage?)")
    nodes = list(g.node)
    if k > 0 and (why := remove_gather(nodes, CONTRACT.x)):
        raise PrefixError(f"stage {k} graph: {why}")
    order, used = live_nodes(nodes, [CONTRACT.features])  # what computes the features
    inputs = [i for i in g.input if i.name in used]
    if [i.name for i in inputs] != [CONTRACT.inputs(k)[0]]:
        raise PrefixError(f"stage {k} body reads {[i.name for i in inputs]}; expected "
                          f"{[CONTRACT.inputs(k)[0]]} only")
    outputs = [o for o in g.output if o.name == CONTRACT.features]
    inits = [i for i in g.initializer if i.name in used]
    graph = helper.make_graph(order, f"body{k}", inputs, outputs, inits)
    out = helper.make_model(graph, ir_version=model.ir_version,
                            opset_imports=list(model.opset_import))
    onnx.checker.check_model(out)
    return out


def chain_bodies(bodies: Sequence[Any]) -> Any:
    """One graph running ``bodies`` (from :func:`body_graph`) back to back: images in,
    the last body's features out."""
    import onnx
    from onnx import helper

    nodes, inits = [], []
    for k, body in enumerate(bodies):
        g = onnx.compose.add_prefix(body, f"p{k}/").graph
        rename = {f"p{k}/{CONTRACT.inputs(k)[0]}": (CONTRACT.images if k == 0 else
                                                    f"p{k - 1}/{CONTRACT.features}")}
        for n in g.node:
            n.input[:] = [rename.get(v, v) for v in n.input]
            nodes.append(n)
        inits += list(g.initializer)
    first = bodies[0].graph.input[0]
    last = onnx.compose.add_prefix(bodies[-1], f"p{len(bodies) - 1}/").graph.output[0]
    graph = helper.make_graph(nodes, "prefix", [first], [last], inits)
    return model_of(graph, bodies)


def prefix_graphs(stage_models: Sequence[Any], full_model: Any) -> list[Any]:
    """One graph per exit point: the ungated prefix up to cut ``k`` (``k < K``), then
    ``full.onnx`` for the final exit."""
    bodies = [body_graph(m, k) for k, m in enumerate(stage_models[:-1])]
    return [chain_bodies(bodies[: k + 1]) for k in range(len(bodies))] + [full_model]
