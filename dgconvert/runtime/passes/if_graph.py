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
one per gate, so calibration rebuilds nothing). A threshold of +inf is off and never exits,
whatever the score; a NaN score never exits (``score >= t`` is false): the rule of
:mod:`dgconvert.core.exits`. Outputs (one element each): ``score``, ``label`` and
``exit_stage``. Gates in ``off`` are composed straight through (no head, no ``If``).

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
from dgconvert.runtime.passes.graph_edit import live_nodes, model_of, remove_gather

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


def _stage_constant(name: str, k: int) -> Any:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name],
                            value=numpy_helper.from_array(np.array([k], np.int64), name))


def _value_infos(names: Sequence[str]) -> list[Any]:
    from onnx import TensorProto, helper

    kinds = (TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64)
    return [helper.make_tensor_value_info(nm, kind, [1])
            for nm, kind in zip(names, kinds, strict=True)]


def compose_if(models: Sequence[Any], off: Collection[int] = ()) -> Any:
    """One ``onnx.ModelProto`` running ``models`` (the stage graphs, in order) on one image
    with an ``If`` per gate that is on (see the module doc); gate ``k`` follows stage ``k``.
    """
    from onnx import TensorProto, helper, numpy_helper

    n = len(models)
    off = checked_off(n, off, "an If graph")
    stages = [_Stage(m, k, n, gathered=k > 0) for k, m in enumerate(models)]
    unused = {s.keep for s in stages if s.keep}

    top: list[Any] = []
    top_inits: list[Any] = [numpy_helper.from_array(np.array([np.inf], np.float32), "if/inf"),
                            numpy_helper.from_array(np.array([np.nan], np.float32), "if/nan")]
    # +inf is off: compare against NaN instead (score >= NaN is false for every score)
    top += [helper.make_node("Less", [THRESHOLDS, "if/inf"], ["if/on"]),
            helper.make_node("Where", ["if/on", THRESHOLDS, "if/nan"], ["if/exit_at"])]
    if n > 2:
        top.append(helper.make_node("Split", ["if/exit_at"],
                                    [f"if/t{k}" for k in range(n - 1)], axis=0,
                                    num_outputs=n - 1))
    else:
        top.append(helper.make_node("Identity", ["if/exit_at"], ["if/t0"]))

    def level(k: int) -> tuple[list[Any], list[Any], tuple[str, str, str]]:
        """Nodes and initializers running stage ``k`` on, and the names of their outputs."""
        s = stages[k]
        nodes, inits = list(s.nodes), list(s.inits)
        if k == n - 1:
            const = f"if/exit{k}"
            return [*nodes, _stage_constant(const, k)], inits, (s.score, s.label, const)
        if k in off:
            deeper, deeper_inits, outs = level(k + 1)
            return nodes + deeper, inits + deeper_inits, outs
        p = f"if{k}/"
        then_outs = (f"{p}then/score", f"{p}then/label", f"{p}then/exit")
        then_nodes = [helper.make_node("Identity", [s.score], [then_outs[0]]),
                      helper.make_node("Identity", [s.label], [then_outs[1]]),
                      _stage_constant(then_outs[2], k)]
        deeper, deeper_inits, else_outs = level(k + 1)
        deeper, read = live_nodes(deeper, list(else_outs))
        deeper_inits = [i for i in deeper_inits if i.name in read]
        then_graph = helper.make_graph(then_nodes, f"exit{k}", [], _value_infos(then_outs))
        else_graph = helper.make_graph(deeper, f"continue{k}", [], _value_infos(else_outs),
                                       deeper_inits)
        outs = (f"{p}{SCORE}", f"{p}{LABEL}", f"{p}exit")
        nodes += [helper.make_node("GreaterOrEqual", [s.score, f"if/t{k}"], [f"{p}exits"]),
                  helper.make_node("If", [f"{p}exits"], list(outs), then_branch=then_graph,
                                   else_branch=else_graph)]
        return nodes, inits, outs

    nodes, inits, outs = level(0)
    finals = [helper.make_node("Identity", [v], [name])
              for v, name in zip(outs, OUTPUTS, strict=True)]
    nodes, used = live_nodes(top + nodes + finals, list(OUTPUTS))
    if read := sorted(unused & used):
        raise ChainError(f"{read} still read once the compaction Gather is removed; expected "
                         "the stage graph to read keep only through that Gather")
    inits = [i for i in top_inits + inits if i.name in used]
    inputs = [stages[0].image_input,
              helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [n - 1])]
    graph = helper.make_graph(nodes, "dgconvert_if", inputs, _value_infos(OUTPUTS), inits)
    return model_of(graph, models, {"": 11})  # If needs opset 11
