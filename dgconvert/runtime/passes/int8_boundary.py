"""Graph pass: int8 stage boundaries for quantized bundles (ONNX Runtime, CPU).

In ORT's optimized graphs of a QDQ bundle (``dgconvert quantize``) the int8 convolutions
run channels-last, so every boundary costs ``Transpose -> DequantizeLinear`` (stage ``k``
hands over float32 NCHW ``features``) and ``Gather -> QuantizeLinear -> Transpose`` (stage
``k + 1`` quantizes them again): four copies of the features, two of them float32. The
quantizer gives both sides the same scale and zero point, so :func:`keep_int8_boundaries`
rewires the optimized graphs to hand over the uint8 tensor itself, channels-last as ORT
computes it: stage ``k`` returns it, stage ``k + 1``'s ``Gather`` compacts its rows and
feeds the int8 convolutions directly, and a gate head that averages the features over
space reads them channels-last too. The backend checks the result against the plain graphs
before using it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dgconvert.core.contract import CONTRACT
from dgconvert.runtime.passes.boundary_fusion import NCHWC, FusionError, NothingToFuse
from dgconvert.runtime.passes.graph_edit import attr

_TO_NCHW = [0, 3, 1, 2]
_TO_NHWC = [0, 2, 3, 1]


@dataclass(frozen=True)
class Int8Output:
    """A stage whose ``features`` leave as uint8/int8: how to read them back as float32."""

    scale: float
    zero_point: int
    channels_last: bool

    def dequantize(self, value: np.ndarray) -> np.ndarray:
        """The contract's float32 ``[M, C, ...]`` features of the int8 tensor ``value``."""
        x = (value.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        if self.channels_last:
            x = np.moveaxis(x, -1, 1)
        return np.ascontiguousarray(x)


@dataclass(frozen=True)
class Int8Stages:
    """What :func:`keep_int8_boundaries` returns: the rewritten models (in place of the
    inputs), which stage inputs arrive int8, which outputs leave int8."""

    models: list[Any]
    int8_input: list[bool]
    int8_output: list[Int8Output | None]
    #: gate heads that pool the int8 features directly (:func:`sum_pooled_heads`)
    pooled_heads: int = 0

    def describe(self) -> str:
        n = sum(o is not None for o in self.int8_output)
        pooled = f"; {self.pooled_heads} heads pool int8" if self.pooled_heads else ""
        return f"int8 ({n} of {len(self.models) - 1} boundaries{pooled})"


def _init(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for i in graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    return None


def _qparams(graph: Any, node: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if len(node.input) != 3:
        return None
    s, z = _init(graph, node.input[1]), _init(graph, node.input[2])
    return None if s is None or z is None or s.size != 1 or z.size != 1 else (s, z)


def _users(graph: Any, tensor: str) -> list[Any]:
    return [n for n in graph.node if tensor in n.input]


def _producer(graph: Any, tensor: str) -> Any | None:
    return next((n for n in graph.node if tensor in n.output), None)


def _output_side(graph: Any) -> tuple[Any, Any | None, tuple[np.ndarray, np.ndarray]] | None:
    """``(DequantizeLinear making features, Transpose to NCHW before it or None, qparams)``."""
    dq = _producer(graph, CONTRACT.features)
    if dq is None or dq.op_type != "DequantizeLinear" or (q := _qparams(graph, dq)) is None:
        return None
    tr = _producer(graph, dq.input[0])
    if tr is not None and tr.op_type == "Transpose" and list(attr(tr, "perm", [])) == _TO_NCHW:
        return dq, tr, q
    return dq, None, q


def _input_side(graph: Any, channels_last: bool) -> tuple[Any, Any, Any | None] | None:
    """``(Gather of x, QuantizeLinear after it, Transpose to NHWC after that or None)``."""
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == CONTRACT.x]
    if len(gathers) != 1 or attr(gathers[0], "axis", 0) != 0:
        return None
    users = _users(graph, gathers[0].output[0])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    q = users[0]
    after = _users(graph, q.output[0])
    if not channels_last:
        return gathers[0], q, None
    if len(after) == 1 and after[0].op_type == "Transpose" and \
            list(attr(after[0], "perm", [])) == _TO_NHWC:
        return gathers[0], q, after[0]
    return None


def _forget_types(graph: Any, *names: str) -> None:
    """Drop the recorded types of tensors whose type the rewrite changed."""
    for vi in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(vi)


def _rename_input(graph: Any, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if v == old else v for v in n.input]


def _pool_channels_last(graph: Any, tr: Any) -> None:
    """Gate heads reading the NCHW copy as ``DequantizeLinear -> ReduceMean(axes 2, 3)`` read
    the channels-last tensor (axes 1, 2); the Transpose goes when nobody reads it."""
    from onnx import numpy_helper

    for dq in _users(graph, tr.output[0]):
        means = _users(graph, dq.output[0])
        if dq.op_type != "DequantizeLinear" or not means or any(
                m.op_type != "ReduceMean" or attr(m, "keepdims", 1) != 0 or len(m.input) != 2
                or (a := _init(graph, m.input[1])) is None
                or sorted(int(v) % 4 for v in a.ravel()) != [2, 3] for m in means):
            continue
        axes = f"{dq.output[0]}_nhwc_axes"
        graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), axes))
        dq.input[0] = tr.input[0]
        for m in means:
            m.input[1] = axes
    if not _users(graph, tr.output[0]):
        graph.node.remove(tr)


def keep_int8_boundaries(models: Sequence[Any]) -> Int8Stages:
    """Rewrite ORT's optimized stage graphs of a quantized bundle (``onnx.ModelProto``,
    modified in place) so every boundary that allows it hands over the int8 tensor."""
    from onnx import TensorProto

    n = len(models)
    int8_in, int8_out = [False] * n, [None] * n
    for k in range(n - 1):
        g, h = models[k].graph, models[k + 1].graph
        out = _output_side(g)
        inp = None if out is None else _input_side(h, out[1] is not None)
        if out is None or inp is None:
            continue
        dq, tr, (scale, zp) = out
        gather, q, tr_in = inp
        qp = _qparams(h, q)
        if qp is None or not (np.array_equal(qp[0], scale) and np.array_equal(qp[1], zp)
                              and qp[1].dtype == zp.dtype):
            continue  # the two sides quantize differently: the float boundary stays
        # stage k: `features` is the int8 tensor (channels-last when ORT computes it so)
        src = tr.input[0] if tr is not None else dq.input[0]
        g.node.remove(dq)
        for node in g.node:
            node.output[:] = [CONTRACT.features if v == src else v for v in node.output]
        _rename_input(g, src, CONTRACT.features)
        _forget_types(g, src, CONTRACT.features)
        if tr is not None:
            _pool_channels_last(g, tr)
        elem = TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.INT8
        for o in g.output:
            if o.name == CONTRACT.features:
                o.type.tensor_type.elem_type = elem
                o.type.tensor_type.ClearField("shape")
        # stage k + 1: Gather the int8 rows, feed them on without QuantizeLinear/Transpose
        last = tr_in if tr_in is not None else q
        _rename_input(h, last.output[0], gather.output[0])
        h.node.remove(q)
        _forget_types(h, gather.output[0])
        if tr_in is not None:
            h.node.remove(tr_in)
        for i in h.input:
            if i.name == CONTRACT.x:
                i.type.tensor_type.elem_type = elem
                i.type.tensor_type.ClearField("shape")
        int8_out[k] = Int8Output(float(scale), int(zp), tr is not None)
        int8_in[k + 1] = True
    if not any(int8_in):
        raise NothingToFuse("no stage boundary is quantized on both sides with one scale")
    return Int8Stages(list(models), int8_in, int8_out)


def _integer_pool(graph: Any, dq: Any, replaced: Sequence[Any], cells: np.ndarray,
                  channels: int, channels_last: bool, out: str, out_shape: Sequence[int]) -> None:
    """Replace ``replaced`` (``DequantizeLinear`` of the uint8 ``features`` and the pooling
    after it) by the mean over each cell: ``MatMulInteger`` of the features against the 0/1
    matrix ``cells`` ``[H*W, n]`` (the zero point subtracted by the op: exact in int32), cast
    and scaled by ``scale / cell size``, reshaped to ``out_shape`` as ``out``. The features
    are NCHW ``[M, C, H, W]`` or ``channels_last`` ``[M, H, W, C]``."""
    from onnx import TensorProto, helper, numpy_helper

    (scale, zp), (hw, n) = _qparams(graph, dq), cells.shape  # type: ignore[misc]
    p = f"{dq.output[0]}/{'sum' if n == 1 else 'grid'}_pool/"
    graph.initializer.extend([
        numpy_helper.from_array((cells.T if channels_last else cells).astype(zp.dtype), p + "cells"),
        numpy_helper.from_array(np.zeros((), zp.dtype), p + "zero"),
        numpy_helper.from_array(np.array([0, hw, channels] if channels_last else [0, channels, hw],
                                         np.int64), p + "rows"),
        numpy_helper.from_array(np.array(out_shape, np.int64), p + "shape"),
        numpy_helper.from_array((float(scale) / cells.sum(axis=0, dtype=np.float64))
                                .astype(np.float32), p + "scale")])
    mm = ([p + "cells", p + "rows_x", p + "zero", dq.input[2]] if channels_last
          else [p + "rows_x", p + "cells", dq.input[2], p + "zero"])
    nodes = [helper.make_node("Reshape", [CONTRACT.features, p + "rows"], [p + "rows_x"]),
             helper.make_node("MatMulInteger", mm, [p + "sum"])]
    if channels_last and n > 1:  # [M, cells, C] -> [M, C, cells]
        nodes.append(helper.make_node("Transpose", [p + "sum"], [p + "sum_t"], perm=[0, 2, 1]))
    nodes += [helper.make_node("Cast", [nodes[-1].output[0]], [p + "sumf"], to=TensorProto.FLOAT),
              helper.make_node("Mul", [p + "sumf", p + "scale"], [p + "mean"]),
              helper.make_node("Reshape", [p + "mean", p + "shape"], [out])]
    at = list(graph.node).index(replaced[0])
    for node in replaced:
        graph.node.remove(node)
    for i, node in enumerate(nodes):
        graph.node.insert(at + i, node)
    _forget_types(graph, *(node.output[0] for node in replaced))


def _sum_pool(graph: Any, shape: Sequence[int]) -> bool:
    """Rewrite ``DequantizeLinear(features) -> ReduceMean(space, keepdims=0)`` of one stage
    graph (``shape``: its contract features ``[M, C, H, W]``); False when it has none."""
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"
           and n.input[0] == CONTRACT.features]
    if len(dqs) != 1 or _qparams(graph, dqs[0]) is None or len(shape) != 4:
        return False
    dq = dqs[0]
    means = _users(graph, dq.output[0])
    if len(means) != 1 or means[0].op_type != "ReduceMean" or len(means[0].input) != 2 \
            or attr(means[0], "keepdims", 1) != 0 or dq.output[0] in {o.name for o in graph.output}:
        return False
    mean = means[0]
    axes = _init(graph, mean.input[1])
    spatial = None if axes is None else sorted(int(v) % 4 for v in axes.ravel())
    if spatial not in ([2, 3], [1, 2]):
        return False
    channels, hw = int(shape[1]), int(shape[2]) * int(shape[3])
    _integer_pool(graph, dq, [dq, mean], np.ones((hw, 1)), channels, spatial == [1, 2],
                  mean.output[0], [0, channels])
    return True


def _grid_cells(size: int, kernel: int, ceil_mode: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each pooling window along an axis (stride = kernel, no pads)."""
    n = -(-size // kernel) if ceil_mode else size // kernel
    return [(i * kernel, min(size, (i + 1) * kernel)) for i in range(n)]


def _cell_pool(graph: Any, dq: Any) -> list[Any] | None:
    """The nodes pooling ``dq``'s output into grid cells: ``[AveragePool]``, or ORT's
    blocked form ``[ReorderInput, AveragePool (NCHWc), ReorderOutput]``; None otherwise."""
    users = _users(graph, dq.output[0])
    if len(users) != 1:
        return None
    first = users[0]
    if first.op_type == "AveragePool" and first.domain in ("", "ai.onnx"):
        return [first]
    if first.op_type != "ReorderInput" or first.domain != NCHWC or attr(first, "channels_last", 0):
        return None
    pools = _users(graph, first.output[0])
    if len(pools) != 1 or pools[0].op_type != "AveragePool" or pools[0].domain != NCHWC:
        return None
    back = _users(graph, pools[0].output[0])
    if len(back) != 1 or back[0].op_type != "ReorderOutput" or attr(back[0], "channels_last", 0):
        return None
    return [first, pools[0], back[0]]


def _grid_pool(graph: Any, shape: Sequence[int]) -> bool:
    """Rewrite ``DequantizeLinear(features) -> AveragePool`` (a ``gridG`` gate pool: stride
    = kernel, no pads; plain or in ORT's blocked form, :func:`_cell_pool`), reading the
    features as they leave (NCHW or, behind a Transpose, channels-last), into the integer
    mean of each cell (:func:`_integer_pool`); False when it has none."""
    if len(shape) != 4:
        return False
    src, tr = CONTRACT.features, None
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == src]
    if not dqs:
        trs = [n for n in _users(graph, src) if n.op_type == "Transpose"
               and list(attr(n, "perm", [])) == _TO_NCHW]
        if len(trs) != 1:
            return False
        tr = trs[0]
        dqs = [n for n in _users(graph, tr.output[0]) if n.op_type == "DequantizeLinear"]
        if len(_users(graph, tr.output[0])) != 1:
            return False
    if len(dqs) != 1 or _qparams(graph, dqs[0]) is None:
        return False
    dq = dqs[0]
    if dq.output[0] in {o.name for o in graph.output} or (chain := _cell_pool(graph, dq)) is None:
        return False
    pool = next(n for n in chain if n.op_type == "AveragePool")
    kernel = [int(v) for v in attr(pool, "kernel_shape", [])]
    strides = [int(v) for v in attr(pool, "strides", kernel) or kernel]
    pads = [int(v) for v in attr(pool, "pads", []) or [0, 0, 0, 0]]
    auto_pad = attr(pool, "auto_pad", b"NOTSET")
    if len(kernel) != 2 or strides != kernel or any(pads) or auto_pad not in (b"NOTSET", "NOTSET"):
        return False
    ceil_mode = int(attr(pool, "ceil_mode", 0))
    channels, h, w = int(shape[1]), int(shape[2]), int(shape[3])
    rows, cols = _grid_cells(h, kernel[0], ceil_mode), _grid_cells(w, kernel[1], ceil_mode)
    cells = np.zeros((h, w, len(rows), len(cols)))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            cells[r0:r1, c0:c1, i, j] = 1
    _integer_pool(graph, dq, [n for n in (tr, dq, *chain) if n is not None],
                  cells.reshape(h * w, -1), channels, tr is not None, chain[-1].output[0],
                  [0, channels, len(rows), len(cols)])
    return True


def sum_pooled_heads(stages: Int8Stages, feature_shapes: Sequence[Sequence[int] | None]
                     ) -> Int8Stages:
    """Gate heads that read a stage's int8 ``features`` as ``DequantizeLinear ->
    ReduceMean`` over space (or ``AveragePool`` over grid cells) sum the int8 values instead
    (``MatMulInteger`` with a ones vector or a 0/1 cell matrix: exact in int32), then scale:
    no float copy of the whole feature map.
    ``feature_shapes``: each stage's contract ``features`` shape (None: leave it). Edits
    ``stages.models`` in place."""
    pooled = 0
    for k, shape in enumerate(feature_shapes):
        if stages.int8_output[k] is not None and shape is not None:
            graph = stages.models[k].graph
            pooled += _sum_pool(graph, shape) or _grid_pool(graph, shape)
    return replace(stages, pooled_heads=pooled)


__all__ = ["FusionError", "Int8Output", "Int8Stages", "keep_int8_boundaries",
           "sum_pooled_heads"]
