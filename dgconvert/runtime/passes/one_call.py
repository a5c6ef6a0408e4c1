"""Graph pass: the batch-1 ``If`` graph and the composed chain in one graph, so that every
one-call path of a bundle runs on one ONNX Runtime session.

::

    images, thresholds, one_image ─► If(one_image)
        then: the If graph (:mod:`dgconvert.runtime.passes.if_graph`) ─► score, label,
              exit_stage; the chain's outputs empty
        else: the composed chain (:mod:`dgconvert.runtime.passes.chain`) ─► s{k}/score,
              s{k}/label; the If graph's outputs empty

``one_image`` (bool ``[1]``) is an input rather than ``batch == 1`` computed in the graph,
so the chain stays correct on one row and the caller says which path it runs. The two
branches keep their own names (prefixes ``one/`` and ``many/``) and initializers.

Why: each ONNX Runtime session owns a thread pool. With the two paths in two sessions, a
pool that spins after its run steals the other's cores when traffic alternates between
batch 1 and larger batches, so both had to stop spinning at the end of each run and pay for
waking up on the next call. One session for both may spin like a default session
(``benchmarks/results/latency.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dgconvert.runtime.passes.chain import THRESHOLDS, ChainError, graph_inputs
from dgconvert.runtime.passes.graph_edit import model_of, prefix_names
from dgconvert.runtime.passes.if_graph import OUTPUTS

#: the input that picks the branch: True for the If graph (one image), False for the chain
ONE_IMAGE = "one_image"


def _branch(model: Any, prefix: str, keep: set[str], empties: list[Any], name: str,
            empties_first: bool) -> Any:
    """``model``'s graph, renamed under ``prefix``, as a branch whose outputs are its own
    and ``empties`` (value infos of the other branch's outputs, given as empty constants),
    in that order or, with ``empties_first``, the other way round."""
    from onnx import GraphProto, helper, numpy_helper

    g = GraphProto()
    g.CopyFrom(model.graph)
    prefix_names(g, prefix, keep)
    nodes, outs = list(g.node), []
    for v in empties:
        const = f"{prefix}empty/{v.name}"
        dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        nodes.append(helper.make_node("Constant", [], [const],
                                      value=numpy_helper.from_array(np.zeros(0, dtype), const)))
        outs.append(helper.make_tensor_value_info(const, v.type.tensor_type.elem_type, None))
    own = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None)
           for o in g.output]
    outs = outs + own if empties_first else own + outs
    return helper.make_graph(nodes, name, [], outs, list(g.initializer))


def compose_one_call(single: Any, chain: Any) -> Any:
    """One ``onnx.ModelProto`` holding ``single`` (:func:`~dgconvert.runtime.passes.if_graph.compose_if`'s
    graph) and ``chain`` (:func:`~dgconvert.runtime.passes.chain.compose_chain`'s) as the
    branches of an ``If`` on the input :data:`ONE_IMAGE`; outputs: ``single``'s, then
    ``chain``'s (the branch not taken gives them empty)."""
    from onnx import TensorProto, helper

    names = graph_inputs(single.graph)
    if names != graph_inputs(chain.graph) or len(names) != 2 or names[1] != THRESHOLDS:
        raise ChainError(f"the If graph reads {names} and the chain {graph_inputs(chain.graph)}; "
                         f"expected both to read the same images and {THRESHOLDS!r}")
    if [o.name for o in single.graph.output] != list(OUTPUTS):
        raise ChainError(f"the If graph's outputs are {[o.name for o in single.graph.output]}; "
                         f"expected {list(OUTPUTS)}")
    keep = set(names)
    single_outs, chain_outs = list(single.graph.output), list(chain.graph.output)
    then_g = _branch(single, "one/", keep, chain_outs, "one_image", empties_first=False)
    else_g = _branch(chain, "many/", keep, single_outs, "batch", empties_first=True)
    outputs = [o.name for o in (*single_outs, *chain_outs)]
    node = helper.make_node("If", [ONE_IMAGE], outputs, then_branch=then_g, else_branch=else_g)
    inputs = [next(i for i in single.graph.input if i.name == names[0]),
              next(i for i in single.graph.input if i.name == THRESHOLDS),
              helper.make_tensor_value_info(ONE_IMAGE, TensorProto.BOOL, [1])]
    # one row from the If graph, none from it when the chain runs: the sizes are symbolic
    declared = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type,
                                              [f"rows_{j}"])
                for j, o in enumerate((*single_outs, *chain_outs))]
    graph = helper.make_graph([node], "dgconvert_one_call", inputs, declared)
    return model_of(graph, (single, chain))
