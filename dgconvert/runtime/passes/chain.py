"""Graph pass: compose the stage graphs into one graph that runs the whole gated chain,
compaction inside (the ONNX Runtime CPU fast path).

The bundle's stage graphs stay the contract; this pass composes them, at load time, into
one graph that ONNX Runtime runs in a single call::

    images ─► stage 0 ─► score0, label0
                 │ features0
                 ▼
    keep1 = NonZero(NOT(score0 >= threshold[0]))   (the runner's exit rule, in the graph)
    stage 1 (its first op: Gather(features0, keep1)) ─► score1, label1  ...

Thresholds are a graph *input* (``thresholds``, float32 ``[num_gates]``), so calibration
never rebuilds anything. Rows that exit are gathered away exactly as between separate
sessions, so deeper stages only see the rows that continue; when nobody continues, the
deeper operators run on empty tensors (a few microseconds each).

A gate that is off (it can never exit a row) costs nothing in a composed chain built with
``off``: its head is not computed and the next stage reads the features without the
compaction ``Gather`` (with every gate off the chain is the full model, stage boundaries
gone).

Why: with one session per stage every boundary costs a session call, and the tensor a stage
hands over is a graph output, which ONNX Runtime's memory planner may not share with an
input, so the last convolution of each stage cannot accumulate the residual in place.
Inside one graph the features are an internal tensor again (measurements:
``benchmarks/results/profile.md``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from dgconvert.core.contract import CONTRACT
from dgconvert.runtime.passes.graph_edit import live_nodes, model_of, remove_gather

THRESHOLDS = "thresholds"


def output_names(k: int) -> tuple[str, str]:
    """The composed graph's outputs for stage ``k``: its score and label."""
    return f"s{k}/{CONTRACT.score}", f"s{k}/{CONTRACT.label}"


class ChainError(Exception):
    """The stage graphs cannot be composed (unexpected inputs/outputs) or disagree."""


def graph_inputs(graph: Any) -> list[str]:
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def checked_off(n: int, off: Collection[int], what: str) -> set[int]:
    """``off`` as a set of gates of ``n`` stage graphs composed into ``what``."""
    if n < 2:
        raise ChainError(f"{what} needs at least 2 stage graphs, got {n}")
    gates = set(off)
    if not gates <= set(range(n - 1)):
        raise ChainError(f"gates {sorted(gates)} cannot be off; {what} has gates 0..{n - 2}")
    return gates


def stage_inputs(model: Any, k: int, n: int) -> list[str]:
    """Stage ``k``'s input names (images, or x and keep), its inputs and outputs checked
    against the contract."""
    names = graph_inputs(model.graph)
    wanted = 1 if k == 0 else 2
    if len(names) != wanted:
        raise ChainError(
            f"stage {k} graph has inputs {names}; expected {wanted} (images, or x and keep)"
        )
    outs = {o.name for o in model.graph.output}
    need = set(CONTRACT.fetched(k, n))
    if not need <= outs:
        raise ChainError(f"stage {k} graph outputs {sorted(outs)}; expected {sorted(need)}")
    return names


def compose_chain(models: Sequence[Any], off: Collection[int] = ()) -> Any:
    """One ``onnx.ModelProto`` running ``models`` (the stage graphs, in order) as a chain.

    Inputs: stage 0's image input (same name) and ``thresholds`` ``[K-1]``. Outputs, for
    each stage ``k``: ``s{k}/score`` and ``s{k}/label`` over the rows that reached it
    (rows of stage ``k`` continue to ``k+1`` iff ``not score >= thresholds[k]``). For the
    gates in ``off`` (gate ``k`` follows stage ``k``) there is neither: every row continues,
    ungathered, and the gate head is left out.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(models)
    off = checked_off(n, off, "a chain")
    unused: list[str] = []
    nodes: list[Any] = []
    inits: list[Any] = []
    inputs: list[Any] = []
    outputs: list[Any] = []
    if n > 2:
        nodes.append(helper.make_node(
            "Split", [THRESHOLDS], [f"chain/t{k}" for k in range(n - 1)], axis=0,
            num_outputs=n - 1))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "chain/axis0"))
    for k, model in enumerate(models):
        graph = onnx.compose.add_prefix(model, f"s{k}/").graph
        names = stage_inputs(model, k, n)
        rename: dict[str, str] = {}
        if k == 0:
            rename[f"s0/{names[0]}"] = names[0]
            inputs.append(next(i for i in graph.input if i.name == f"s0/{names[0]}"))
            inputs[-1].name = names[0]
        elif k - 1 in off:  # every row continues: the stage reads the features as they are
            why = remove_gather(graph.node, f"s{k}/{names[0]}")
            unused.append(f"s{k}/{names[1]}")  # keep: read by nothing once the Gather is gone
            if why:
                raise ChainError(f"stage {k} graph: {why} (gate {k - 1} off)")
            rename[f"s{k}/{names[0]}"] = f"s{k - 1}/{CONTRACT.features}"
        else:
            t = f"chain/t{k - 1}" if n > 2 else THRESHOLDS
            prev, p = f"s{k - 1}/", f"chain/{k}_"
            nodes += [
                helper.make_node("GreaterOrEqual", [prev + CONTRACT.score, t], [p + "exits"]),
                helper.make_node("Not", [p + "exits"], [p + "continues"]),
                helper.make_node("NonZero", [p + "continues"], [p + "nonzero"]),
                helper.make_node("Squeeze", [p + "nonzero", "chain/axis0"], [p + CONTRACT.keep]),
            ]
            rename[f"s{k}/{names[0]}"] = prev + CONTRACT.features
            rename[f"s{k}/{names[1]}"] = p + CONTRACT.keep
        for node in graph.node:
            node.input[:] = [rename.get(v, v) for v in node.input]
            nodes.append(node)
        inits += list(graph.initializer)
        if k in off:
            continue
        rows = [f"rows{k}"]  # the rows that reached stage k
        score, label = output_names(k)
        outputs += [
            helper.make_tensor_value_info(score, TensorProto.FLOAT, rows),
            helper.make_tensor_value_info(label, TensorProto.INT64, rows),
        ]
    inputs.append(helper.make_tensor_value_info(THRESHOLDS, TensorProto.FLOAT, [n - 1]))
    nodes, used = live_nodes(nodes, [o.name for o in outputs])
    if read := sorted(set(unused) & used):
        raise ChainError(f"{read} still read once the compaction Gather is removed; expected "
                         "the stage graph to read keep only through that Gather")
    inits = [i for i in inits if i.name in used]
    return model_of(helper.make_graph(nodes, "dgconvert_chain", inputs, outputs, inits), models)
