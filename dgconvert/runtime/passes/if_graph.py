"""Graph pass: in-graph exits for a single image, each gate's decision an ONNX ``If``.

The bundle's stage graphs stay the contract; this pass composes them, at load time, into
one graph for batch 1 in which the deeper stages live in the ``else`` branch of the gate
before them, so they simply do not run when the image exits::

    images ─► stage 0 ─► score0, label0, features0
    If(score0 >= t0)
      then: (score0, label0, exit 0)
      else: stage 1 (reads features0, no Gather: the one row continues) ─► score1 ...
            If(score1 >= t1) then ... else ... stage K ─► (scoreK, labelK, exit K)

Inputs: stage 0's image input (same name, one row) and ``thresholds`` (float32 ``[K]``,
one per gate, so calibration rebuilds nothing): the exit rule's ``exit_at``
(:class:`~dgconvert.core.exits.ExitRule`), NaN where a gate is off, so that it never exits,
whatever the score; a NaN score never exits either (``score >= t`` is false): the rule of
:mod:`dgconvert.core.exits`. Outputs (one element each): ``score``, ``label`` and
``exit_stage``. Gates in ``off`` are composed straight through (no head, no ``If``).

At one row every operator costs ONNX Runtime its dispatch (microseconds, more than the
arithmetic of a gate head), so the composition runs as few as it can: a gate's label is
computed in its exit branch only, a margin score (``top1 - top2`` of a ``TopK``) is one
``MatMul`` with ``[1, -1]`` (the same float, rounded once), and the outermost ``If`` writes
the graph's outputs itself.

Why: a chain of stage sessions pays a session call per stage reached; the composed chain
(:mod:`dgconvert.runtime.passes.chain`) pays one call but runs every deeper operator on an
empty tensor after the exit. Here one call runs exactly the stages the image reaches; an
``If`` costs ONNX Runtime a couple of microseconds (``benchmarks/results/latency.md``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from dgconvert.core.contract import CONTRACT
from dgconvert.runtime.passes.chain import (
    THRESHOLDS,
    ChainError,
    checked_off,
    stage_inputs,
)
from dgconvert.runtime.passes.graph_edit import (
    attr,
    live_nodes,
    model_of,
    reads,
    remove_gather,
)

#: the graph's outputs, one element each
SCORE, LABEL, EXIT_STAGE = CONTRACT.score, CONTRACT.label, "exit_stage"
OUTPUTS = (SCORE, LABEL, EXIT_STAGE)


class _Stage:
    """Stage ``k``'s nodes and initializers, renamed into the composed graph (prefix
    ``s{k}/``; stage ``k >= 1`` reads the previous features directly)."""

    def __init__(self, model: Any, k: int, n: int, gathered: bool) -> None:
        import onnx

        graph = onnx.compose.add_prefix(model, f"s{k}/").graph
        names = stage_inputs(model, k, n)
        rename: dict[str, str] = {}
        self.keep = ""
        if k == 0:
            rename[f"s0/{names[0]}"] = names[0]
            self.image_input = next(i for i in graph.input if i.name == f"s0/{names[0]}")
            self.image_input.name = names[0]
        else:
            if gathered and (why := remove_gather(graph.node, f"s{k}/{names[0]}")):
                raise ChainError(f"stage {k} graph: {why}")
            rename[f"s{k}/{names[0]}"] = f"s{k - 1}/{CONTRACT.features}"
            self.keep = f"s{k}/{names[1]}"  # read by nothing once the Gather is gone
        self.nodes = list(graph.node)
        for node in self.nodes:
            node.input[:] = [rename.get(v, v) for v in node.input]
        self.inits = list(graph.initializer)
        self.score, self.label = f"s{k}/{CONTRACT.score}", f"s{k}/{CONTRACT.label}"
        self.features = f"s{k}/{CONTRACT.features}"

    def split_label(self) -> list[Any]:
        """Remove and return the nodes that only compute the label (for the exit branch)."""
        label_nodes, _ = live_nodes(self.nodes, [self.label])
        _, rest = live_nodes(self.nodes, [self.score, self.features])
        only = [nd for nd in label_nodes if not set(nd.output) & rest]
        ids = {id(nd) for nd in only}
        self.nodes = [nd for nd in self.nodes if id(nd) not in ids]
        return only

    def margin_as_matmul(self) -> bool:
        """Rewrite ``score = Gather(v, 0) - Gather(v, 1)`` over ``v = TopK(.., k=2)`` values
        (axis 1) as ``MatMul(v, [[1], [-1]])`` (score ``[N, 1]``); False when the head is
        not of that shape."""
        from onnx import helper, numpy_helper

        producer = {o: nd for nd in self.nodes for o in nd.output}
        inits = {i.name: i for i in self.inits}

        def const(name: str) -> list[Any] | None:  # a small initializer's values
            return numpy_helper.to_array(inits[name]).tolist() if name in inits else None

        sub = producer.get(self.score)
        if sub is None or sub.op_type != "Sub":
            return False
        gathers = [producer.get(v) for v in sub.input]
        if any(g is None or g.op_type != "Gather" or attr(g, "axis", 0) != 1 for g in gathers):
            return False
        values = gathers[0].input[0]  # type: ignore[union-attr]
        topk = producer.get(values)
        if (topk is None or topk.op_type != "TopK" or topk.output[0] != values
                or any(g.input[0] != values for g in gathers)  # type: ignore[union-attr]
                or attr(topk, "axis", -1) not in (1, -1) or attr(topk, "largest", 1) != 1
                or const(topk.input[1]) != [2]
                or [const(g.input[1]) for g in gathers] != [0, 1]):  # type: ignore[union-attr]
            return False
        readers = [v for nd in self.nodes for v in nd.input]
        if any(readers.count(g.output[0]) != 1 for g in gathers):  # type: ignore[union-attr]
            return False
        weights = f"{self.score}/plus_minus"
        self.inits.append(numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32), weights))
        keep = [nd for nd in self.nodes if nd is not sub and all(nd is not g for g in gathers)]
        keep.insert(keep.index(topk) + 1,
                    helper.make_node("MatMul", [values, weights], [self.score]))
        self.nodes = keep
        return True


def _stage_constant(name: str, k: int) -> Any:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name],
                            value=numpy_helper.from_array(np.array([k], np.int64), name))


def _value_infos(names: Sequence[str]) -> list[Any]:
    from onnx import TensorProto, helper

    kinds = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64)
    return [helper.make_tensor_value_info(nm, kind, [1])
            for nm, kind in zip(names, kinds, strict=True)]


def compose_if(models: Sequence[Any], off: Collection[int] = (), lean: bool = True) -> Any:
    """One ``onnx.ModelProto`` running ``models`` (the stage graphs, in order) on one image
    with an ``If`` per gate that is on (see the module doc); gate ``k`` follows stage ``k``.
    ``lean=False``: the heads as exported and ``Identity`` outputs (for comparisons).
    """
    from onnx import TensorProto, helper, numpy_helper

    n = len(models)
    off = checked_off(n, off, "an If graph")
    stages = [_Stage(m, k, n, gathered=k > 0) for k, m in enumerate(models)]
    unused = {s.keep for s in stages if s.keep}
    one = "if/one"  # the shape [1]: a margin score [1, 1] leaves its exit branch as [1]
    top_inits = [numpy_helper.from_array(np.array([1], np.int64), one)]
    top: list[Any] = []
    if n > 2:
        top.append(helper.make_node("Split", [THRESHOLDS],
                                    [f"if/t{k}" for k in range(n - 1)], axis=0,
                                    num_outputs=n - 1))

    def level(k: int) -> tuple[list[Any], list[Any], tuple[str, str, str]]:
        """Nodes and initializers running stage ``k`` on, and the names of their outputs."""
        s = stages[k]
        if k == n - 1:
            const = f"if/exit{k}"
            outs = (s.score, s.label, const)
            return [*s.nodes, _stage_constant(const, k)], list(s.inits), outs
        if k in off:
            deeper, deeper_inits, outs = level(k + 1)
            return s.nodes + deeper, s.inits + deeper_inits, outs
        p = f"if{k}/"
        then_outs = (f"{p}then/score", f"{p}then/label", f"{p}then/exit")
        margin = lean and s.margin_as_matmul()
        label_nodes = s.split_label() if lean else []
        for nd in label_nodes:
            nd.output[:] = [then_outs[1] if v == s.label else v for v in nd.output]
        then_nodes = [helper.make_node("Reshape", [s.score, one], [then_outs[0]]) if margin
                      else helper.make_node("Identity", [s.score], [then_outs[0]])]
        then_nodes += label_nodes or [helper.make_node("Identity", [s.label], [then_outs[1]])]
        then_nodes.append(_stage_constant(then_outs[2], k))
        deeper, deeper_inits, else_outs = level(k + 1)
        deeper, read = live_nodes(deeper, list(else_outs))
        deeper_inits = [i for i in deeper_inits if i.name in read]
        then_graph = helper.make_graph(then_nodes, f"exit{k}", [], _value_infos(then_outs))
        else_graph = helper.make_graph(deeper, f"continue{k}", [], _value_infos(else_outs),
                                       deeper_inits)
        threshold = f"if/t{k}" if n > 2 else THRESHOLDS
        outs = (f"{p}{SCORE}", f"{p}{LABEL}", f"{p}exit")
        nodes = s.nodes + [
            helper.make_node("GreaterOrEqual", [s.score, threshold], [f"{p}exits"]),
            helper.make_node("If", [f"{p}exits"], list(outs), then_branch=then_graph,
                             else_branch=else_graph)]
        return nodes, list(s.inits), outs

    nodes, inits, outs = level(0)
    nodes = top + nodes
    nodes, used = live_nodes(nodes, list(outs))
    _name_outputs(nodes, outs, lean)
    if read := sorted(unused & used):
        raise ChainError(f"{read} still read once the compaction Gather is removed; expected "
                         "the stage graph to read keep only through that Gather")
    inits = [i for i in top_inits + inits if i.name in used]
    inputs = [stages[0].image_input,
              helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [n - 1])]
    graph = helper.make_graph(nodes, "dgconvert_if", inputs, _value_infos(OUTPUTS), inits)
    return model_of(graph, models, {"": 11})  # If needs opset 11


def _name_outputs(nodes: list[Any], outs: Sequence[str], rename: bool = True) -> None:
    """Give the values ``outs`` (produced by ``nodes`` of the top graph) the graph's output
    names, or (not ``rename``, or one is also read in the graph) copy them out with an
    ``Identity``."""
    from onnx import helper

    read = {v for nd in nodes for v in reads(nd)}
    for value, name in zip(outs, OUTPUTS, strict=True):
        producer = next((nd for nd in nodes if value in nd.output), None)
        if not rename or producer is None or value in read:
            nodes.append(helper.make_node("Identity", [value], [name]))
        else:
            producer.output[:] = [name if v == value else v for v in producer.output]
