"""``dgconvert quantize``: an int8 copy of a bundle for the CPU, verified against its fp32
source. Torch-free (numpy, onnx, onnxruntime).

Every stage graph and ``full.onnx`` go through ONNX Runtime's own static quantization
(``onnxruntime.quantization.quantize_static``: QDQ format, uint8 activations, int8 weights
(uint8 on x86 CPUs without VNNI, where ORT's u8s8 kernels saturate: :func:`weights_for_cpu`),
MinMax calibration; ``quant_pre_process`` first), calibrated on images put through the
bundle's own preprocessing (:func:`~dgconvert.core.preprocess.prepare_images`):

- stage ``k >= 1`` is calibrated on the features the *quantized* stage ``k - 1`` produces
  (what it sees at run time), with ``keep = arange``;
- the scale and zero point of stage ``k``'s ``features`` are handed to stage ``k + 1``'s
  gathered input (``TensorQuantOverrides``): a boundary quantizes once, so the runtime may
  pass the int8 tensor itself between sessions
  (:mod:`dgconvert.runtime.passes.int8_boundary`);
- ``keep_fp32="gates"`` (the default, chosen by measurement: ``docs/quantization.md``)
  leaves the gate heads (the nodes that compute ``score``/``label``/``gate_logits`` but not
  the features) in float32.

:func:`verify_quantized` then compares the int8 bundle with the fp32 one on the same
images, all at once (label agreement per stage and of the full model, score correlation per
gate, accuracy), and :class:`QuantizationMismatch` lists every check below its
:class:`Bounds`; nothing is written then.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle, file_sha256, stamp_digests, write_manifest
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BundleError, DGConvertError, InputError
from dgconvert.core.io import atomic_directory
from dgconvert.core.manifest import Manifest, QuantizationInfo, portable
from dgconvert.core.preprocess import prepare_images
from dgconvert.runtime.cpu_features import u8s8_saturates
from dgconvert.runtime.passes.graph_edit import live_nodes

PRECISION = "int8"
#: calibration images by default, by measurement on the reference model (docs/quantization.md):
#: MinMax ranges only widen with more images, and 4,096 images agreed less than 1,024
DEFAULT_IMAGES = 1024
KEEP_FP32 = ("gates", "none")
#: activation range calibrators of ``onnxruntime.quantization.CalibrationMethod``
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
_BATCH = 64  # rows per calibration batch (ORT's MinMax keeps only each batch's min and max)


class QuantizeError(BundleError):
    """The quantizer cannot take this input (bundle, data, settings, a stage graph)."""


class QuantizationMismatch(DGConvertError, AssertionError):
    """The int8 bundle is below the documented bounds; lists every failing check."""

    def __init__(self, report: QuantizationReport) -> None:
        self.report = report
        lines = "\n  ".join(report.failures)
        super().__init__(
            f"{len(report.failures)} check(s) of the int8 bundle against its fp32 source "
            f"failed on {report.images} images:\n  {lines}\nFix: more calibration images "
            "(--calibration-images), --per-channel, --keep-fp32 gates, or keep this bundle fp32."
        )


#: weight types: ``auto`` picks by this CPU (:func:`weights_for_cpu`)
WEIGHT_TYPES = ("auto", "int8", "uint8")


def weights_for_cpu(cpuinfo: str | None = None) -> str:
    """``uint8`` where ONNX Runtime's u8s8 kernels saturate
    (:func:`~dgconvert.runtime.cpu_features.u8s8_saturates`; its u8u8 ones widen to int16
    first and do not), else ``int8`` (ORT's default, the faster kernels with VNNI)."""
    return "uint8" if u8s8_saturates(cpuinfo) else "int8"


@dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize (recorded in the manifest with ONNX Runtime's version)."""

    per_channel: bool = True
    calibration_images: int = DEFAULT_IMAGES
    keep_fp32: str = "gates"  # "gates": gate heads stay float32; "none"
    calibrate_method: str = "minmax"  # one of CALIBRATE_METHODS
    fp32_stem: bool = True  # convolutions on fewer than 4 channels stay float32
    weights: str = "auto"  # one of WEIGHT_TYPES

    @property
    def weight_type(self) -> str:
        """``int8`` or ``uint8``: :attr:`weights`, or for ``auto`` this CPU's choice."""
        return weights_for_cpu() if self.weights == "auto" else self.weights

    def check(self) -> None:
        if self.weights not in WEIGHT_TYPES:
            raise QuantizeError(f"weights is {self.weights!r}; expected one of {WEIGHT_TYPES}. "
                                "Fix: --weights auto (default).")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise QuantizeError(
                f"calibrate_method is {self.calibrate_method!r}; expected one of "
                f"{CALIBRATE_METHODS}. Fix: --calibrate-method minmax (default).")
        if self.keep_fp32 not in KEEP_FP32:
            raise QuantizeError(f"keep_fp32 is {self.keep_fp32!r}; expected one of {KEEP_FP32}. "
                                "Fix: --keep-fp32 gates (default) or none.")
        if self.calibration_images < 1:
            raise QuantizeError(
                f"calibration_images is {self.calibration_images}; expected at least 1 (the "
                f"quantizer needs activations to set ranges). Fix: --calibration-images "
                f"{DEFAULT_IMAGES}.")

    @property
    def ort_method(self) -> str:
        """The name in ``onnxruntime.quantization.CalibrationMethod``."""
        return {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}[
            self.calibrate_method]

    def to_dict(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"format": "QDQ", "activations": "uint8", "weights": self.weight_type,
                "weights_choice": self.weights,
                "calibrate_method": self.ort_method, "per_channel": self.per_channel,
                "keep_fp32": self.keep_fp32, "fp32_stem": self.fp32_stem,
                "preprocess": "quant_pre_process",
                "boundaries": "shared scale (TensorQuantOverrides)",
                "onnxruntime": ort.__version__}


@dataclass(frozen=True)
class Bounds:
    """What the int8 bundle must reach against its fp32 source (fractions; ``accuracy_drop``
    in points). Defaults chosen by measurement: ``docs/quantization.md``."""

    stage_agreement: float = 0.95  # each gate's label and the final stage's
    full_agreement: float = 0.97  # full.onnx labels
    score_correlation: float = 0.95
    accuracy_drop: float = 1.0


@dataclass
class QuantizationReport:
    """The int8 bundle against its fp32 source on the same images."""

    images: int
    stage_agreement: list[float]  # label agreement per stage (gates, then the final stage)
    full_agreement: float  # full.onnx labels, int8 vs fp32 (end to end, no exits)
    score_correlation: list[float]  # Pearson correlation of each gate's scores
    accuracy: dict[str, float] = field(default_factory=dict)  # fp32 / int8 full model
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Readable summary (``dgconvert quantize``, ``info``)."""
        out = [f"checked on {self.images} images against the fp32 source:",
               "  label agreement per stage: "
               + ", ".join(f"{100 * a:.2f} %" for a in self.stage_agreement),
               f"  full model label agreement: {100 * self.full_agreement:.2f} %",
               "  score correlation per gate: "
               + ", ".join(f"{c:.4f}" for c in self.score_correlation)]
        if self.accuracy:
            a = self.accuracy
            out.append(f"  accuracy (full model): fp32 {100 * a['fp32']:.2f} %, int8 "
                       f"{100 * a['int8']:.2f} % (drop {100 * (a['fp32'] - a['int8']):.2f} pt)")
        return out


def source_digest(bundle: Bundle) -> str:
    """SHA-256 over every stage graph and ``full.onnx`` of ``bundle``: how a quantized
    bundle names its fp32 source."""
    h = hashlib.sha256()
    for k in range(bundle.num_stages):
        h.update(file_sha256(bundle.stage_file(k)).encode())
    h.update(file_sha256(bundle.full_file()).encode())
    return h.hexdigest()


def find_source(bundle: Bundle, hint: str | Path | None = None) -> Bundle:
    """The fp32 bundle ``bundle`` was quantized from: ``hint`` (``--source``), else the
    recorded name beside it, else any bundle beside it with the recorded digest."""
    q = bundle.manifest.quantization
    if q is None:
        raise QuantizeError(f"{bundle.path} is not a quantized bundle; it has no fp32 source.")
    if hint is not None:
        candidates = [Path(hint)]
    else:
        parent = bundle.path.resolve().parent
        named = [parent / q.source_bundle] if q.source_bundle else []
        candidates = named + sorted(p.parent for p in parent.glob("*/manifest.json"))
    for path in candidates:
        try:
            cand = Bundle.load(path)
        except BundleError:
            continue
        if cand.manifest.quantization is None and source_digest(cand) == q.source_digest:
            return cand
    where = f"--source {hint}" if hint is not None else f"beside {bundle.path}"
    raise QuantizeError(
        f"found no fp32 bundle {where} with the digest {q.source_digest[:16]}… that "
        f"{bundle.path} records for its source {q.source_bundle!r}. Fix: pass --source "
        "PATH.dg (the fp32 bundle it was quantized from), or --drop-vs int8.")


# -- quantizing one graph ---------------------------------------------------------------------


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over fixed feeds."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self._it = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _feeds(k: int, x: np.ndarray, name: str, batch: int = _BATCH) -> Iterator[dict[str, Any]]:
    """Stage ``k``'s calibration feeds over the rows of ``x`` (``keep = arange``)."""
    for s in range(0, len(x), batch):
        part = np.ascontiguousarray(x[s:s + batch])
        yield ({name: part} if k == 0 else
               {CONTRACT.x: part, CONTRACT.keep: np.arange(len(part), dtype=np.int64)})


def _head_nodes(model: Any) -> list[str]:
    """Names of the nodes of a gated stage that do not compute ``features`` (the gate head)."""
    body, _ = live_nodes(list(model.graph.node), [CONTRACT.features])
    ids = {id(n) for n in body}
    return [n.name for n in model.graph.node if id(n) not in ids]


#: convolutions with fewer input channels per group than this stay float32: int8 kernels
#: gain nothing on a 1- or 3-channel stem (measured 5.7x slower than fp32 on the demo
#: model's 1-channel stem, docs/quantization.md)
MIN_INT8_CONV_CHANNELS = 4


def _thin_convs(model: Any) -> list[str]:
    """Names of the ``Conv`` nodes (group 1) whose weight has fewer than
    :data:`MIN_INT8_CONV_CHANNELS` input channels (a stem on the image)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in shapes:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        dims = shapes[n.input[1]]
        if group == 1 and len(dims) >= 2 and dims[1] < MIN_INT8_CONV_CHANNELS:
            out.append(n.name)
    return out


def _gathered(model: Any) -> str | None:
    """The output of the contract's ``Gather(x, keep)`` (what stage k >= 1 quantizes first)."""
    out = [n.output[0] for n in model.graph.node if n.op_type == "Gather"
           and n.input and n.input[0] == CONTRACT.x]
    return out[0] if len(out) == 1 else None


def boundary_qparams(model: Any, tensor: str = CONTRACT.features) -> tuple[Any, Any] | None:
    """``(scale, zero point)`` of the ``DequantizeLinear`` producing ``tensor`` in a QDQ
    graph, or None when ``tensor`` is not quantized there."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and tensor in n.output and len(n.input) == 3 \
                and n.input[1] in inits and n.input[2] in inits:
            return (numpy_helper.to_array(inits[n.input[1]]),
                    numpy_helper.to_array(inits[n.input[2]]))
    return None


def quantize_graph(path: Path, out: Path, batches: Iterator[dict[str, np.ndarray]],
                   settings: QuantizeSettings, *, fp32_head: bool = False,
                   input_qparams: tuple[Any, Any] | None = None, what: str = "graph") -> Any:
    """Quantize the ONNX graph at ``path`` into ``out`` with ONNX Runtime; returns the
    quantized ``ModelProto``. ``fp32_head``: leave the gate head in float32;
    ``input_qparams``: the scale and zero point of the gathered input (stage k >= 1)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="dgconvert-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            model = onnx.load(str(pre))
            for i, n in enumerate(model.graph.node):  # nodes_to_exclude goes by name
                n.name = n.name or f"dgc_node_{i}"
            onnx.save(model, str(pre))
            # not CalibMaxIntermediateOutputs: ORT 1.32's MinMax calibrator drops (does not
            # merge) what it collected when it reaches that count
            extra: dict[str, Any] = {}
            gathered = _gathered(model)
            if input_qparams is not None and gathered is not None:
                scale, zp = input_qparams
                extra["TensorQuantOverrides"] = {gathered: [
                    {"scale": np.asarray(scale, np.float32), "zero_point": np.asarray(zp)}]}
            quantize_static(
                str(pre), str(out), _Reader(batches), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=(QuantType.QUInt8 if settings.weight_type == "uint8"
                             else QuantType.QInt8),
                per_channel=settings.per_channel,
                calibrate_method=getattr(CalibrationMethod, settings.ort_method),
                nodes_to_exclude=(_head_nodes(model) if fp32_head else [])
                + (_thin_convs(model) if settings.fp32_stem else []),
                extra_options=extra)
        except Exception as exc:  # noqa: BLE001 - ORT and onnx raise their own types
            raise QuantizeError(
                f"ONNX Runtime's quantizer refused {what} ({path.name}): "
                f"{type(exc).__name__}: {str(exc)[:300]}. Expected a float32 ONNX graph it can "
                "quantize. Fix: keep this bundle fp32, or re-export the model without the op "
                "named above.") from exc
    return onnx.load(str(out))


def _run_features(model: Any, k: int, x: np.ndarray, name: str) -> np.ndarray:
    """Stage ``k``'s features on all rows of ``x`` (the calibration input of stage k + 1)."""
    import onnxruntime as ort

    from dgconvert.runtime.onnxruntime_backend import session_options

    sess = ort.InferenceSession(model.SerializeToString(), session_options(),
                                providers=["CPUExecutionProvider"])
    parts = [sess.run([CONTRACT.features], f)[0] for f in _feeds(k, x, name, 256)]
    return np.concatenate(parts)


# -- the bundle -------------------------------------------------------------------------------


def calibration_images(bundle: Bundle, images: Any, what: str = "--data") -> np.ndarray:
    """``images`` as the bundle's float32 input (its own preprocessing), checked."""
    try:
        x = prepare_images(images, bundle.input_shape, bundle.normalization)
    except InputError as exc:
        raise QuantizeError(f"{what} does not fit {bundle.path}: {exc}") from exc
    if len(x) == 0:
        raise QuantizeError(f"{what} has 0 images; expected at least 1 calibration image "
                            f"(the default uses {DEFAULT_IMAGES}). Fix: a data spec with images.")
    return x


def quantize_bundle(
    source: str | Path | Bundle,
    output: str | Path,
    images: Any,
    labels: np.ndarray | None = None,
    *,
    data: str = "",
    settings: QuantizeSettings | None = None,
    bounds: Bounds | None = None,
    force: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[Bundle, QuantizationReport]:
    """Write the int8 copy of ``source`` to ``output`` (atomically; nothing on any error)
    and return it with its :class:`QuantizationReport`.

    The first ``settings.calibration_images`` of ``images`` calibrate; the report is taken
    on the rest (on all of them when nothing is left). ``labels`` add accuracy. Raises
    :class:`QuantizeError` on bad input and :class:`QuantizationMismatch` below ``bounds``.
    """
    src = source if isinstance(source, Bundle) else Bundle.load(source)
    settings, bounds = settings or QuantizeSettings(), bounds or Bounds()
    settings.check()
    if settings.weights == "auto" and settings.weight_type == "uint8":
        log("weights uint8: this x86 CPU has no VNNI, where ONNX Runtime's uint8 x int8 "
            "kernels saturate (--weights int8 to force them)")
    if src.manifest.quantization is not None:
        q = src.manifest.quantization
        raise QuantizeError(
            f"{src.path} is already quantized ({q.precision}, from {q.source_bundle or '?'}); "
            "expected an fp32 bundle. Fix: quantize the fp32 bundle it came from.")
    if Path(output).resolve() == src.path.resolve():
        raise QuantizeError(f"-o {output} is the fp32 bundle itself; expected a new path (the "
                            "int8 bundle names its fp32 source, which must stay). Fix: -o "
                            f"{src.path.with_name(src.path.stem + '-int8.dg')}.")
    x = calibration_images(src, images)
    n_cal = min(settings.calibration_images, len(x))
    cal, held = x[:n_cal], x[n_cal:]
    check_x, check_y = (held, None if labels is None else labels[n_cal:]) if len(held) else (x, labels)
    name = src.manifest.input.name
    with atomic_directory(output, force) as tmp:
        feats, qparams = cal, None
        for k in range(src.num_stages):
            log(f"stage {k}: calibrating on {len(feats)} rows")
            gated = k < src.num_gates
            model = quantize_graph(
                src.stage_file(k), tmp / src.manifest.stages[k].file, _feeds(k, feats, name),
                settings, fp32_head=gated and settings.keep_fp32 == "gates",
                input_qparams=qparams, what=f"stage {k}")
            if gated:
                feats = _run_features(model, k, feats, name)
                qparams = boundary_qparams(model)
        log("full model: calibrating")
        quantize_graph(src.full_file(), tmp / src.manifest.full.file, _feeds(0, cal, name),
                       settings, what="the full model")
        info = QuantizationInfo(PRECISION, source_digest(src), src.path.name, portable(data),
                                n_cal, settings.to_dict())

        def mark(m: Manifest) -> None:
            m.quantization = info
            m.engines = {}  # engines were built from the fp32 graphs
            m.thresholds.source = f"copied from the fp32 source ({m.thresholds.source}); " \
                                  "recalibrate"
            stamp_digests(m, tmp)

        manifest = src.manifest.updated(mark)
        write_manifest(tmp, manifest)
        log(f"checking against the fp32 source on {len(check_x)} images")
        report = verify_quantized(src, Bundle.load(tmp), check_x, check_y, bounds)
        info.verification = {**report.to_dict(), "bounds": asdict(bounds)}
        write_manifest(tmp, manifest.updated(lambda m: setattr(m, "quantization", info)))
        if report.failures:
            raise QuantizationMismatch(report)
    return Bundle.load(output), report


# -- verification -----------------------------------------------------------------------------


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok].astype(np.float64), b[ok].astype(np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 1.0 if len(a) and np.array_equal(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _run(bundle: Bundle, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every gate's scores and labels, the final stage's labels and full.onnx's labels."""
    from dgconvert.runtime.runner import GatedRunner

    with GatedRunner(bundle, backend="onnxruntime", fuse_boundaries=False,
                     compose=False) as runner:
        full = runner.full_logits(x).argmax(axis=1)
        if bundle.num_gates == 0:  # one stage, no gates (a GaterNet): nothing to collect
            none = np.zeros((len(x), 0))
            return none, none, runner.predict(x).labels, full
        rec = runner.collect(x)
        return rec.scores, rec.labels, rec.final_labels, full


def verify_quantized(fp32: Bundle, int8: Bundle, images: Any,
                     labels: np.ndarray | None = None,
                     bounds: Bounds | None = None) -> QuantizationReport:
    """Compare ``int8`` with its ``fp32`` source on ``images``, every check at once (every
    sample through every stage); ``report.failures`` lists the checks below ``bounds``."""
    bounds = bounds or Bounds()
    x = prepare_images(images, fp32.input_shape, fp32.normalization)
    (s32, l32, final32, f32), (s8, l8, final8, f8) = _run(fp32, x), _run(int8, x)
    agree = [float(np.mean(l8[:, k] == l32[:, k])) for k in range(fp32.num_gates)]
    agree.append(float(np.mean(final8 == final32)))
    corr = [_correlation(s8[:, k], s32[:, k]) for k in range(fp32.num_gates)]
    report = QuantizationReport(len(x), agree, float(np.mean(f8 == f32)), corr)
    fails = report.failures
    for k, a in enumerate(agree):
        if a < bounds.stage_agreement:
            fails.append(f"stage {k}: label agreement {100 * a:.2f} % < "
                         f"{100 * bounds.stage_agreement:.2f} %")
    for k, c in enumerate(corr):
        if not c >= bounds.score_correlation:
            fails.append(f"gate {k}: score correlation {c:.4f} < {bounds.score_correlation}")
    if report.full_agreement < bounds.full_agreement:
        fails.append(f"full model: label agreement {100 * report.full_agreement:.2f} % < "
                     f"{100 * bounds.full_agreement:.2f} %")
    if labels is not None and len(labels) == len(x):
        y = np.asarray(labels)
        report.accuracy = {"fp32": float(np.mean(f32 == y)), "int8": float(np.mean(f8 == y))}
        drop = 100 * (report.accuracy["fp32"] - report.accuracy["int8"])
        if drop > bounds.accuracy_drop:
            fails.append(f"full model: accuracy drop {drop:.2f} pt > {bounds.accuracy_drop} pt")
    return report


def quantized_stages(bundle: Bundle) -> Sequence[int]:
    """Stages whose graph holds QuantizeLinear nodes (for ``info`` and tests)."""
    import onnx

    return [k for k in range(bundle.num_stages) if any(
        n.op_type == "QuantizeLinear" for n in onnx.load(str(bundle.stage_file(k))).graph.node)]
