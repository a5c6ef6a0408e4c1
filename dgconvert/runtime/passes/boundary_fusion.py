"""Graph pass: stage boundaries in ONNX Runtime's blocked ``NCHWc`` layout (CPU).

On x86 ORT rewrites convolutions to its blocked layout, so an optimized stage graph ends with
``ReorderOutput`` (blocked -> NCHW) and the next begins with ``Gather`` + ``ReorderInput``
(NCHW -> blocked): two extra copies of the features per boundary, plus the gate head's
pooling over the NCHW copy. :func:`fuse_nchwc_boundaries` takes ORT's optimized stage graphs and
rewires them so the features cross the boundary blocked: the reorders disappear, ``Gather``
works on blocked rows (the batch stays the outermost axis), and the gate pools with ORT's
NCHWc ``GlobalAveragePool``. The result says, per stage, whether its input arrives blocked
and how many channels (and padded channels) its blocked output has; the backend then checks
the rewritten graphs against the plain ones before using them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.contract import CONTRACT
from dgconvert.runtime.passes.graph_edit import attr

NCHWC = "com.microsoft.nchwc"
_NCHW = "features_nchw"  # the plain copy of the features, while gates still read it


class FusionError(Exception):
    """The optimized graphs are not in the shape the rewrite expects."""


class NothingToFuse(FusionError):
    """No boundary crosses in the blocked layout (e.g. no convolutions there): the pass
    does not apply; not a failure."""


@dataclass(frozen=True)
class BlockedOutput:
    """A stage whose ``features`` output is blocked: real and padded channel counts."""

    channels: int
    padded: int


@dataclass(frozen=True)
class FusedStages:
    """What :func:`fuse_nchwc_boundaries` returns: the rewritten models (in place of the inputs),
    which stage inputs arrive blocked, which outputs leave blocked."""

    models: list[Any]
    blocked_input: list[bool]  # per stage
    blocked_output: list[BlockedOutput | None]  # per stage (None: plain NCHW or last)

    @property
    def fused(self) -> int:
        """Number of fused boundaries."""
        return sum(o is not None for o in self.blocked_output)

    def describe(self) -> str:
        return f"nchwc ({self.fused} of {len(self.models) - 1} boundaries)"


def fuse_nchwc_boundaries(models: Sequence[Any]) -> FusedStages:
    """Rewrite ORT's optimized stage graphs (``onnx.ModelProto``, modified in place) so the
    features cross every boundary that allows it in the blocked layout."""
    n = len(models)
    outs = [_output_side(m.graph) for m in models[:-1]]
    ins = [None] + [_input_side(m.graph) for m in models[1:]]
    fused = [outs[k] is not None and ins[k + 1] is not None for k in range(n - 1)]
    if not any(fused):
        raise NothingToFuse("no stage boundary uses ORT's blocked layout (nothing to fuse)")
    blocked_out: list[BlockedOutput | None] = [None] * n
    for k in range(n):
        g = models[k].graph
        if k > 0:
            _drop_keep_reshape(g)
            if fused[k - 1]:
                _rewrite_input(g)
        if k < n - 1 and fused[k]:
            _, channels, padded = outs[k]  # type: ignore[misc]
            _rewrite_output(g, channels, padded, f"dgc{k}")
            blocked_out[k] = BlockedOutput(channels, padded)
    return FusedStages(list(models), [k > 0 and fused[k - 1] for k in range(n)], blocked_out)



def _consumers(graph: Any, tensor: str) -> list[Any]:
    return [n for n in graph.node if tensor in n.input]


def _output_side(graph: Any) -> tuple[Any, int, int] | None:
    """``(ReorderOutput node, channels, padded channels)`` producing ``features``, if any."""
    prod = [n for n in graph.node if CONTRACT.features in n.output]
    if len(prod) != 1 or prod[0].op_type != "ReorderOutput" or prod[0].domain != NCHWC:
        return None
    node = prod[0]
    if attr(node, "channels_last", 0):
        return None
    src = [n for n in graph.node if node.input[0] in n.output]
    inits = {i.name: list(i.dims) for i in graph.initializer}
    padded = 0
    if len(src) == 1 and src[0].op_type == "Conv" and src[0].domain == NCHWC:
        padded = int((inits.get(src[0].input[1]) or [0])[0])
    return node, int(attr(node, "channels")), padded


def _input_side(graph: Any) -> tuple[Any, list[Any]] | None:
    """``(Gather node, ReorderInput nodes after it)`` at the start of a stage, if any."""
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == CONTRACT.x]
    if len(gathers) != 1 or attr(gathers[0], "axis", 0) != 0:
        return None
    users = _consumers(graph, gathers[0].output[0])
    if not users or any(u.op_type != "ReorderInput" or u.domain != NCHWC
                        or attr(u, "channels_last", 0) for u in users):
        return None
    return gathers[0], users


def _is_spatial_mean(graph: Any, node: Any) -> bool:
    """ReduceMean over axes (2, 3) of a 4-D tensor, keepdims=0."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
        return False
    if attr(node, "keepdims", 1) != 0:
        return False
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1:
        from onnx import numpy_helper

        init = {i.name: i for i in graph.initializer}.get(node.input[1])
        axes = None if init is None else numpy_helper.to_array(init).tolist()
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _rewrite_output(graph: Any, channels: int, padded: int, tag: str) -> None:
    """Make ``features`` the blocked tensor; gates pool it with NCHWc GlobalAveragePool."""
    from onnx import helper, numpy_helper

    node = next(n for n in graph.node if CONTRACT.features in n.output)
    blocked = node.input[0]
    node.output[0] = _NCHW
    for n in graph.node:
        if n is not node:
            n.input[:] = [_NCHW if v == CONTRACT.features else v for v in n.input]
    for n in graph.node:  # the blocked tensor becomes the graph output `features`
        n.input[:] = [CONTRACT.features if v == blocked else v for v in n.input]
        n.output[:] = [CONTRACT.features if v == blocked else v for v in n.output]
    for user in list(_consumers(graph, _NCHW)):
        if not _is_spatial_mean(graph, user):
            continue
        at = list(graph.node).index(user)
        out = user.output[0]
        new = [helper.make_node("GlobalAveragePool", [CONTRACT.features], [f"{tag}_gap"], domain=NCHWC),
               helper.make_node("Flatten", [f"{tag}_gap"],  # works on 0 rows too
                                [out if padded == channels else f"{tag}_flat"], axis=1)]
        if padded != channels:
            for nm, v in ((f"{tag}_s0", 0), (f"{tag}_sc", channels), (f"{tag}_ax", 1)):
                graph.initializer.append(numpy_helper.from_array(np.array([v], np.int64), nm))
            new.append(helper.make_node("Slice", [f"{tag}_flat", f"{tag}_s0", f"{tag}_sc",
                                                  f"{tag}_ax"], [out]))
        graph.node.remove(user)
        for j, nn in enumerate(new):
            graph.node.insert(at + j, nn)
    if not _consumers(graph, _NCHW):
        graph.node.remove(node)
    for o in graph.output:
        if o.name == CONTRACT.features:
            o.type.tensor_type.ClearField("shape")


def _rewrite_input(graph: Any) -> None:
    """Drop the ReorderInput after the Gather: ``x`` arrives blocked already."""
    gather, reorders = _input_side(graph)  # type: ignore[misc]
    for r in reorders:
        for n in graph.node:
            n.input[:] = [gather.output[0] if v == r.output[0] else v for v in n.input]
        graph.node.remove(r)
    for i in graph.input:
        if i.name == CONTRACT.x:
            i.type.tensor_type.ClearField("shape")


def _drop_keep_reshape(graph: Any) -> None:
    """``Reshape(keep, [-1])`` before the Gather is a no-op on the 1-D ``keep``: remove it."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    for n in list(graph.node):
        if n.op_type == "Reshape" and n.input[0] == CONTRACT.keep and n.input[1] in inits:
            if numpy_helper.to_array(inits[n.input[1]]).tolist() != [-1]:
                continue
            for u in graph.node:
                u.input[:] = [CONTRACT.keep if v == n.output[0] else v for v in u.input]
            graph.node.remove(n)


