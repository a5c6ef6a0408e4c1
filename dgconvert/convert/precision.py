"""Reduced-precision ONNX stage graphs for strongly typed TensorRT (10 with STRONGLY_TYPED, 11+).

TensorRT 11 removed ``BuilderFlag.FP16``/``INT8`` and the INT8 calibrators: precision lives
in the graph ("Strongly Typed Networks Are Now Required",
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x.html).

- :func:`convert_to_fp16` — our own graph rewrite (numpy + onnx, runs on any CPU): float32
  initializers and compute become float16, while the tensors the runtime reads stay float32
  (``images`` in, ``score``/``gate_logits``/``logits`` out); ``keep`` and ``label`` (int64)
  are untouched. Reductions, softmax, arg-max and the small ops after them (the gate head)
  stay float32: a node runs in float32 when its op is in ``fp32_ops`` or when all its float
  inputs come from float32 nodes ("sticky" float32 after a global pool), so gate scores keep
  float32 resolution at the thresholds. Casts are inserted only at precision boundaries.
- :func:`quantize_int8` — explicit Q/DQ INT8 via NVIDIA ModelOpt's ONNX PTQ
  (``modelopt.onnx.quantization.quantize``,
  https://nvidia.github.io/TensorRT-Model-Optimizer/reference/generated/modelopt.onnx.quantization.quantize.html).
- :func:`stage_calibration_inputs` — each stage's real inputs (``images``; ``x``/``keep``)
  computed from calibration images with the FP32 graphs on ONNX Runtime (CPU), the data both
  INT8 paths calibrate on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BackendUnavailableError, BundleError

#: Graph inputs/outputs that stay float32: what the runtime feeds and reads on the host.
_DIM_SEP = "x"  # ModelOpt's calibration_shapes write dims as NxCxHxW (not the input x)
FP32_IO = frozenset({CONTRACT.images, CONTRACT.score, CONTRACT.gate_logits, CONTRACT.logits})

#: Ops computed in float32: reductions (global pooling), softmax family, arg-max, top-k and
#: overflow-prone elementwise ops. Everything fed only by them stays float32 too.
FP32_OPS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Softmax", "LogSoftmax", "Hardmax",
    "TopK", "ArgMax", "ArgMin", "Exp", "Log", "Pow", "CumSum",
})

#: Inputs that are float but not data (kept float32 whatever the node's precision).
_NON_DATA_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Report:
    """What :func:`convert_to_fp16` did (for logs and tests)."""

    fp16_nodes: int = 0
    fp32_nodes: list[str] = field(default_factory=list)  # op types kept in float32
    casts: int = 0
    clipped_values: int = 0  # initializer values outside the float16 range (clipped)


def convert_to_fp16(
    model: Any,
    fp32_io: Iterable[str] = FP32_IO,
    fp32_ops: Iterable[str] = FP32_OPS,
    fp32_nodes: Iterable[str] = (),
    report: Fp16Report | None = None,
) -> Any:
    """Return a float16 copy of an ONNX ``ModelProto`` (see the module docstring).

    Float graph inputs/outputs named in ``fp32_io`` keep float32 (a Cast follows/precedes
    them); other float inputs/outputs (``x``, ``features``) become float16, halving the
    activations handed from stage to stage. Raises :class:`BundleError` for graphs this
    rewrite does not handle (control flow).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    report = report if report is not None else Fp16Report()
    fp32_io, fp32_ops, fp32_nodes = set(fp32_io), set(fp32_ops), set(fp32_nodes)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if len(m.functions):
        from onnx import inliner

        m = inliner.inline_local_functions(m)
    g = m.graph
    bad = sorted({n.op_type for n in g.node if n.op_type in _CONTROL_FLOW})
    if bad:
        raise BundleError(
            f"FP16 conversion got a graph with control flow {bad}; expected a flat stage graph. "
            "Fix: build with --precision fp32, or export the stage without data-dependent control flow."
        )
    _constants_to_initializers(g, numpy_helper)
    inferred = onnx.shape_inference.infer_shapes(m)
    elem: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16

    # precision of every float tensor as currently produced, and whether a node produced it
    prec: dict[str, int] = {}
    from_node: dict[str, bool] = {}
    for inp in g.input:
        if inp.name in inits or elem.get(inp.name) != F32:
            continue
        want = F32 if inp.name in fp32_io else F16
        inp.type.tensor_type.elem_type = want
        prec[inp.name], from_node[inp.name] = want, False

    new_nodes: list[Any] = []
    cast_cache: dict[tuple[str, int], str] = {}
    init_cache: dict[tuple[str, int], str] = {}
    new_inits: list[Any] = []

    def as_prec(name: str, want: int) -> str:
        if name in inits:  # initializers adapt: convert once per precision
            if inits[name].data_type != F32 or want == F32:
                return name
            key = (name, want)
            if key not in init_cache:
                arr = numpy_helper.to_array(inits[name])
                clipped = np.abs(arr) > _FP16_MAX
                report.clipped_values += int(clipped.sum())
                arr16 = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)
                init_cache[key] = f"{name}__fp16"
                new_inits.append(numpy_helper.from_array(arr16, init_cache[key]))
            return init_cache[key]
        if prec.get(name, want) == want:
            return name
        key = (name, want)
        if key not in cast_cache:
            cast_cache[key] = f"{name}__to_{'fp32' if want == F32 else 'fp16'}"
            new_nodes.append(helper.make_node("Cast", [name], [cast_cache[key]], to=want,
                                              name=f"{cast_cache[key]}_cast"))
            report.casts += 1
        return cast_cache[key]

    for node in g.node:
        skip = _NON_DATA_INPUTS.get(node.op_type, set())
        data = [
            (i, name) for i, name in enumerate(node.input)
            if name and i not in skip and elem.get(name) == F32
        ]
        produced = [name for _, name in data if name not in inits]
        if node.op_type in fp32_ops or node.name in fp32_nodes:
            want = F32
        elif produced and all(prec.get(n) == F32 and from_node.get(n) for n in produced):
            want = F32  # sticky: only float32 nodes feed it (e.g. the gate head after pooling)
        else:
            want = F16
        for i, name in data:
            node.input[i] = as_prec(name, want)
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == F32:
                to.i = want
        elif node.op_type in {"ConstantOfShape"} and want == F16:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for out in node.output:
            if out and elem.get(out) == F32:
                prec[out], from_node[out] = want, True
        if want == F32:
            report.fp32_nodes.append(node.op_type)
        else:
            report.fp16_nodes += 1
        new_nodes.append(node)

    # graph outputs: float32 for fp32_io names, float16 otherwise; rename + Cast on mismatch
    renames: dict[str, str] = {}
    tail: list[Any] = []
    for out in g.output:
        if elem.get(out.name) != F32:
            continue
        want = F32 if out.name in fp32_io else F16
        have = prec.get(out.name, F32)
        out.type.tensor_type.elem_type = want
        if have != want:
            inner = f"{out.name}__{'fp16' if have == F16 else 'fp32'}"
            renames[out.name] = inner
            tail.append(helper.make_node("Cast", [inner], [out.name], to=want, name=f"{out.name}_out_cast"))
            report.casts += 1
    for node in new_nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]

    del g.node[:]
    g.node.extend(new_nodes + tail)
    used = {name for n in g.node for name in n.input}
    kept = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    onnx.checker.check_model(m)
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _constants_to_initializers(g: Any, numpy_helper: Any) -> None:
    """Float ``Constant`` nodes become initializers so they adapt to their consumers."""
    from onnx import TensorProto

    keep = []
    for node in g.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.t.data_type == TensorProto.FLOAT:
            t = numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0])
            g.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


# -- calibration data ----------------------------------------------------------------------
def stage_calibration_inputs(bundle: Bundle, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Each stage's inputs on calibration ``images`` (float32, normalized), computed with the
    FP32 stage graphs on ONNX Runtime CPU: ``[{CONTRACT.images}, {CONTRACT.x, CONTRACT.keep}, ...]``.

    Every sample goes through every stage (``keep = arange``), so the statistics cover all
    samples, not only the ones a threshold would let through.
    """
    import onnxruntime as ort

    from dgconvert.runtime.onnxruntime_backend import session_options

    x = np.ascontiguousarray(images, dtype=np.float32)
    so = session_options()
    out: list[dict[str, np.ndarray]] = []
    prev: np.ndarray | None = None
    for k in range(bundle.num_stages):
        sess = ort.InferenceSession(str(bundle.stage_file(k)), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        if k == 0:
            feeds = {names[0]: x}
        else:
            assert prev is not None
            feeds = {names[0]: prev, names[1]: np.arange(len(prev), dtype=np.int64)}
        out.append(feeds)
        if k < bundle.num_stages - 1:
            prev = sess.run([CONTRACT.features], feeds)[0]
    return out


def calibration_batches(inputs: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches of one stage's calibration inputs (``keep`` re-indexed per batch).

    A short tail is dropped: a TensorRT calibrator's batch size is fixed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first = next(iter(inputs.values()))
    n = len(first)
    for start in range(0, n - batch_size + 1, batch_size):
        batch = {}
        for name, arr in inputs.items():
            if name == CONTRACT.keep:
                batch[name] = np.arange(batch_size, dtype=np.int64)
            else:
                batch[name] = np.ascontiguousarray(arr[start:start + batch_size])
        yield batch


#: ModelOpt's calibration execution providers: the GPU when its provider loads, else the CPU
CALIBRATION_EPS = ("cuda:0", "cpu")


def modelopt_calibration_options(calibration: dict[str, np.ndarray]) -> dict[str, Any]:
    """``calibration_shapes`` and ``calibration_eps`` for ModelOpt's ``quantize``: one
    calibration step over all N rows of every input.

    ModelOpt's ``CalibrationDataProvider`` cuts every input into ``N / shape[first input][0]``
    chunks with ``np.array_split``, a missing shape meaning the graph's with dynamic dims set
    to 1: N one-row chunks, ``keep`` included, whose indices then point past the one-row ``x``
    ("indices element out of data bounds"). Full-N shapes keep ``x`` and ``keep`` whole
    (``keep = arange(N)`` indexes all of ``x``).
    """
    rows = {name: int(np.shape(arr)[0]) for name, arr in calibration.items() if np.ndim(arr)}
    keep = calibration.get(CONTRACT.keep)
    x_rows = rows.get(CONTRACT.x)
    if keep is not None and x_rows is not None and len(keep) and int(np.max(keep)) >= x_rows:
        raise BundleError(
            f"calibration keep indexes row {int(np.max(keep))} but x has {x_rows} rows; "
            "expected keep = arange(N) over the previous stage's N rows "
            "(stage_calibration_inputs builds it)."
        )
    shapes = ",".join(f"{name}:{_DIM_SEP.join(str(int(d)) for d in np.shape(arr))}"
                      for name, arr in calibration.items())
    return {"calibration_shapes": shapes, "calibration_eps": list(CALIBRATION_EPS)}


def quantize_int8(onnx_path: Path, calibration: dict[str, np.ndarray], output_path: Path,
                  method: str = "entropy") -> Path:
    """Explicit INT8 (Q/DQ) ONNX via ModelOpt PTQ, calibrated on ``calibration`` (input name ->
    array) in one step over all rows (:func:`modelopt_calibration_options`). Non-quantized
    layers are float16; graph input/output types are kept."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise BackendUnavailableError(
            "INT8 on TensorRT 11+ needs explicit Q/DQ nodes from NVIDIA ModelOpt, which is not "
            "installed. Fix: pip install 'nvidia-modelopt[onnx]' (or build with --precision fp16)."
        ) from exc
    quantize(
        onnx_path=str(onnx_path),
        quantize_mode="int8",
        calibration_data=calibration,
        calibration_method=method,
        output_path=str(output_path),
        high_precision_dtype="fp16",
        **modelopt_calibration_options(calibration),
    )
    if not Path(output_path).is_file():
        raise BundleError(f"ModelOpt quantization wrote no file at {output_path}")
    return Path(output_path)
