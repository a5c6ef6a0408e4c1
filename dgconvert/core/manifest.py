"""The typed bundle manifest (``manifest.json``): one reader, one writer, one threshold
encoding. Wrong types raise :class:`~dgconvert.core.errors.BundleError` naming the entry.

Schema version 1 (see ``docs/internals.md``)::

    format, schema_version, dgconvert_version, created, opset
    input      {name, shape [null, C, H, W], dtype, normalization {scale, mean, std} | null}
    classes    [str], num_classes
    stages     [{index, file, sha256?, inputs [{name, shape, dtype}], outputs [...], flops,
                 gate {type, score, flops, ...} | null (last stage)}]
    full       {file, sha256?, flops}
    thresholds {values [number | null (= +inf, gate off)], source, updated}
    calibration null | {...}     engines {key: {...}}     source {...}
    gaternet   (optional; GaterNet bundles) {gater {...}, data, samples, layers [{name,
                filters, always_on, always_off, input_dependent, pruned, on_rate}],
                flops_masked, flops_pruned, pruned_share}
    quantization (optional; quantized bundles, record version 1) {version, precision,
                source {bundle, digest}, calibration {data, images}, settings {...},
                verification {...}}

A bundle may have a single stage (no gates: e.g. a GaterNet without early exits).
Keys this version does not know are kept and written back unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dgconvert.core.errors import BundleError
from dgconvert.core.gates import FilterGateLayer
from dgconvert.core.version import __version__

FORMAT = "dgconvert-bundle"
SCHEMA_VERSION = 1
FIX = "Fix: re-export the bundle (`dgconvert export MODEL.pt -o MODEL.dg --force`)."


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def package_version() -> str:
    return __version__


def portable(spec: str) -> str:
    """A data or file spec without this machine's folders (``/home/u/d/cal.npz[:9]`` ->
    ``cal.npz[:9]``): manifests record names, never local absolute paths."""
    return ",".join(part.replace("\\", "/").rsplit("/", 1)[-1] for part in spec.split(","))


# -- thresholds: the one encoding -------------------------------------------------------------


def encode_threshold(value: float) -> float | None:
    """A threshold as JSON: a finite number, or ``null`` for +inf (the gate is off)."""
    v = float(value)
    if math.isnan(v) or v == -math.inf:
        raise BundleError(
            f"threshold {value!r} cannot be stored; expected a finite number or +inf (gate off). "
            "Fix: use a finite threshold (a value below every score exits every sample)."
        )
    return None if v == math.inf else v


def decode_threshold(value: Any, where: str = "threshold") -> float:
    """The inverse of :func:`encode_threshold`."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BundleError(f"{where} is {value!r}; expected a finite number or null (gate off). {FIX}")
    return float(value)


def encode_thresholds(values: Sequence[float]) -> list[float | None]:
    return [encode_threshold(v) for v in values]


def decode_thresholds(values: Any, where: str = "thresholds") -> list[float]:
    if not isinstance(values, list):
        raise BundleError(f"{where} is {values!r:.60}; expected a list of numbers/null. {FIX}")
    return [decode_threshold(v, f"{where}[{i}]") for i, v in enumerate(values)]


# -- checked reading ----------------------------------------------------------------------


def _kind(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in ts)


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str,
         default: Any = ..., required: bool = True) -> Any:
    """``obj[key]`` checked against ``types`` (``bool`` never passes as a number)."""
    if key not in obj:
        if required and default is ...:
            raise BundleError(f"manifest {where} lacks {key!r}. {FIX}")
        return None if default is ... else default
    value = obj[key]
    ts = types if isinstance(types, tuple) else (types,)
    if float in ts:
        ts = (*ts, int)
    ok = isinstance(value, ts) and not (isinstance(value, bool) and bool not in ts)
    if not ok:
        raise BundleError(
            f"manifest {where}.{key} is {value!r:.60} ({type(value).__name__}); expected "
            f"{_kind(types)}. {FIX}"
        )
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"manifest {where} is {value!r:.60}; expected an object. {FIX}")
    return value


def _rest(obj: dict[str, Any], known: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


def _dim(value: Any, where: str) -> int | str | None:
    if value is None or isinstance(value, str) or (isinstance(value, int)
                                                   and not isinstance(value, bool)):
        return value
    raise BundleError(f"manifest {where} is {value!r:.40}; expected an integer, a name or null. "
                      f"{FIX}")


# -- the records --------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """One graph input or output: name, shape (symbolic batch axis), dtype."""

    name: str
    shape: list[int | str | None]
    dtype: str

    @classmethod
    def parse(cls, obj: Any, where: str) -> TensorInfo:
        o = _obj(obj, where)
        shape = _get(o, "shape", list, where)
        return cls(_get(o, "name", str, where),
                   [_dim(d, f"{where}.shape[{i}]") for i, d in enumerate(shape)],
                   _get(o, "dtype", str, where))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class GateInfo:
    """The gate head fused into a stage: type, score kind, FLOPs, and its spec's other keys."""

    type: str
    score: str
    flops: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> GateInfo:
        o = _obj(obj, where)
        return cls(_get(o, "type", str, where), _get(o, "score", str, where),
                   _get(o, "flops", int, where, default=0),
                   _rest(o, ("type", "score", "flops")))

    @classmethod
    def from_spec(cls, spec: dict[str, Any], flops: int) -> GateInfo:
        """From a gate head's spec (``{"type", "score", ...}``) and its FLOPs."""
        return cls.parse({**spec, "flops": int(flops)}, "gate spec")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "score": self.score, **self.extra, "flops": self.flops}


@dataclass
class StageInfo:
    """One stage graph: its file (relative to the bundle), I/O, FLOPs and gate."""

    index: int
    file: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    flops: int = 0
    gate: GateInfo | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: False when ONNX Runtime crashed running this stage on ``M = 0`` rows at export: the
    #: runner never runs a stage no row reaches, but no path may feed it an empty batch
    empty_batch: bool = True

    @classmethod
    def parse(cls, obj: Any, where: str) -> StageInfo:
        o = _obj(obj, where)
        gate = o.get("gate")
        return cls(
            _get(o, "index", int, where),
            _get(o, "file", str, where),
            [TensorInfo.parse(t, f"{where}.inputs[{i}]")
             for i, t in enumerate(_get(o, "inputs", list, where))],
            [TensorInfo.parse(t, f"{where}.outputs[{i}]")
             for i, t in enumerate(_get(o, "outputs", list, where))],
            _get(o, "flops", int, where, default=0),
            None if gate is None else GateInfo.parse(gate, f"{where}.gate"),
            _get(o, "sha256", (str, type(None)), where, default=None),
            _rest(o, ("index", "file", "inputs", "outputs", "flops", "gate", "sha256",
                      "empty_batch")),
            _get(o, "empty_batch", bool, where, default=True),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "file": self.file}
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        d.update({"inputs": [t.to_dict() for t in self.inputs],
                  "outputs": [t.to_dict() for t in self.outputs],
                  "flops": self.flops,
                  "gate": None if self.gate is None else self.gate.to_dict(), **self.extra})
        if not self.empty_batch:
            d["empty_batch"] = False
        return d


@dataclass
class FullInfo:
    """``full.onnx``: the ungated model."""

    file: str
    flops: int = 0
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> FullInfo:
        o = _obj(obj, where)
        return cls(_get(o, "file", str, where), _get(o, "flops", int, where, default=0),
                   _get(o, "sha256", (str, type(None)), where, default=None),
                   _rest(o, ("file", "flops", "sha256")))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file}
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return {**d, "flops": self.flops, **self.extra}


@dataclass
class InputInfo:
    """The images a bundle takes: name, shape ``[null, C, H, W]``, dtype, normalization."""

    name: str
    shape: list[int | None]
    dtype: str = "float32"
    normalization: dict[str, Any] | None = None

    @classmethod
    def parse(cls, obj: Any, where: str) -> InputInfo:
        o = _obj(obj, where)
        shape = _get(o, "shape", list, where)
        if len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                 for s in shape[1:]):
            raise BundleError(f"manifest {where}.shape is {shape!r:.60}; expected [null, C, ...] "
                              f"with positive integer sample dimensions. {FIX}")
        norm = _get(o, "normalization", (dict, type(None)), where, default=None)
        if norm is not None:
            for key in ("mean", "std"):
                v = norm.get(key)
                if v is not None and not (isinstance(v, list) and all(
                        isinstance(e, int | float) and not isinstance(e, bool) for e in v)):
                    raise BundleError(f"manifest {where}.normalization.{key} is {v!r:.40}; "
                                      f"expected a list of numbers. {FIX}")
            scale = norm.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, int | float) or scale == 0:
                raise BundleError(f"manifest {where}.normalization.scale is {scale!r:.40}; "
                                  f"expected a non-zero number. {FIX}")
        return cls(_get(o, "name", str, where), [shape[0], *shape[1:]],
                   _get(o, "dtype", str, where, default="float32"), norm)

    @property
    def sample_shape(self) -> list[int]:
        return [int(s) for s in self.shape[1:]]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "normalization": self.normalization}


@dataclass
class ThresholdInfo:
    """Per-gate thresholds (``+inf`` = gate off), where they came from, and when."""

    values: list[float]
    source: str = ""
    updated: str | None = None

    @classmethod
    def parse(cls, obj: Any, where: str) -> ThresholdInfo:
        o = _obj(obj, where)
        return cls(decode_thresholds(o.get("values"), f"{where}.values"),
                   _get(o, "source", str, where, default=""),
                   _get(o, "updated", (str, type(None)), where, default=None))

    def to_dict(self) -> dict[str, Any]:
        return {"values": encode_thresholds(self.values), "source": self.source,
                "updated": self.updated}


@dataclass
class GaterNetInfo:
    """A GaterNet bundle: its gater, the per-layer kinds of filter gates counted on
    ``samples`` calibration samples (``data``), and what pruning the always-off filters
    saved (per-image FLOPs of the exported model before and after; ``pruned_share``: pruned
    filters / gated filters)."""

    layers: list[FilterGateLayer]
    samples: int = 0
    data: str = ""
    gater: dict[str, Any] = field(default_factory=dict)
    flops_masked: int = 0
    flops_pruned: int = 0
    pruned_share: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> GaterNetInfo:
        o = _obj(obj, where)
        layers = []
        for i, raw in enumerate(_get(o, "layers", list, where)):
            w = f"{where}.layers[{i}]"
            lo = _obj(raw, w)
            layers.append(FilterGateLayer(
                _get(lo, "name", str, w), _get(lo, "filters", int, w),
                _get(lo, "always_on", int, w), _get(lo, "always_off", int, w),
                _get(lo, "input_dependent", int, w), _get(lo, "pruned", int, w, default=0),
                float(_get(lo, "on_rate", float, w, default=0.0))))
        return cls(layers, _get(o, "samples", int, where, default=0),
                   _get(o, "data", str, where, default=""),
                   _get(o, "gater", dict, where, default={}),
                   _get(o, "flops_masked", int, where, default=0),
                   _get(o, "flops_pruned", int, where, default=0),
                   float(_get(o, "pruned_share", float, where, default=0.0)),
                   _rest(o, ("layers", "samples", "data", "gater", "flops_masked",
                             "flops_pruned", "pruned_share")))

    @property
    def filters(self) -> int:
        return sum(layer.filters for layer in self.layers)

    def totals(self) -> dict[str, int]:
        """Gates of each kind over all layers."""
        return {k: sum(getattr(layer, k) for layer in self.layers)
                for k in ("always_on", "always_off", "input_dependent", "pruned")}

    def to_dict(self) -> dict[str, Any]:
        return {"gater": dict(self.gater), "data": self.data, "samples": self.samples,
                "layers": [layer.to_dict() for layer in self.layers],
                "flops_masked": self.flops_masked, "flops_pruned": self.flops_pruned,
                "pruned_share": self.pruned_share, **self.extra}


@dataclass
class QuantizationInfo:
    """A quantized bundle (``dgconvert quantize``): its precision, the fp32 bundle it came
    from (name and :func:`~dgconvert.convert.quantize.source_digest`), the calibration images
    and the quantizer's settings. ``version``: of this record (bundles without it are fp32)."""

    precision: str
    source_digest: str
    source_bundle: str = ""
    calibration_data: str = ""
    calibration_images: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, obj: Any, where: str) -> QuantizationInfo:
        o = _obj(obj, where)
        src = _get(o, "source", dict, where)
        cal = _get(o, "calibration", dict, where, default={})
        return cls(_get(o, "precision", str, where),
                   _get(src, "digest", str, f"{where}.source"),
                   _get(src, "bundle", str, f"{where}.source", default=""),
                   _get(cal, "data", str, f"{where}.calibration", default=""),
                   _get(cal, "images", int, f"{where}.calibration", default=0),
                   _get(o, "settings", dict, where, default={}),
                   _get(o, "verification", dict, where, default={}),
                   _get(o, "version", int, where, default=1),
                   _rest(o, ("precision", "source", "calibration", "settings", "verification",
                             "version")))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "precision": self.precision,
                "source": {"bundle": self.source_bundle, "digest": self.source_digest},
                "calibration": {"data": self.calibration_data,
                                "images": self.calibration_images},
                "settings": dict(self.settings), "verification": dict(self.verification),
                **self.extra}


_TOP = ("format", "schema_version", "dgconvert_version", "created", "input", "classes",
        "num_classes", "stages", "full", "thresholds", "calibration", "engines", "source",
        "opset", "gaternet", "quantization")


@dataclass
class Manifest:
    """Everything ``manifest.json`` says, typed."""

    input: InputInfo
    num_classes: int
    stages: list[StageInfo]
    full: FullInfo
    thresholds: ThresholdInfo
    classes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    gaternet: GaterNetInfo | None = None
    quantization: QuantizationInfo | None = None
    dgconvert_version: str = field(default_factory=package_version)
    created: str = field(default_factory=now_iso)
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_gates(self) -> int:
        return len(self.stages) - 1

    @property
    def precision(self) -> str:
        """``"fp32"``, or the quantized bundle's precision (``"int8"``)."""
        return "fp32" if self.quantization is None else self.quantization.precision

    @classmethod
    def parse(cls, obj: Any, where: str = "manifest.json") -> Manifest:
        """Validate a decoded ``manifest.json`` (format, version, types, consistency)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise BundleError(f"{where}: manifest format is {got!r}, expected {FORMAT!r}")
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where} has manifest schema_version {version!r} (written by dgconvert "
                f"{obj.get('dgconvert_version', '?')}); this dgconvert {package_version()} reads "
                f"version {SCHEMA_VERSION}. {FIX}"
            )
        missing = [k for k in ("input", "num_classes", "stages", "thresholds", "full")
                   if k not in obj]
        if missing:
            raise BundleError(f"{where}: manifest lacks keys {missing}. {FIX}")
        stages = _get(obj, "stages", list, "")
        if len(stages) < 1:
            raise BundleError(f"{where}: expected at least 1 stage, got {len(stages)}. {FIX}")
        classes = _get(obj, "classes", (list, type(None)), "", default=None) or []
        if not all(isinstance(c, str) for c in classes):
            raise BundleError(f"{where}: classes must be strings, got {classes!r:.60}. {FIX}")
        engines = _get(obj, "engines", (dict, type(None)), "", default=None) or {}
        for key, rec in engines.items():
            _obj(rec, f"engines[{key!r}]")
        m = cls(
            input=InputInfo.parse(obj["input"], "input"),
            num_classes=_get(obj, "num_classes", int, ""),
            stages=[StageInfo.parse(s, f"stages[{i}]") for i, s in enumerate(stages)],
            full=FullInfo.parse(obj["full"], "full"),
            thresholds=ThresholdInfo.parse(obj["thresholds"], "thresholds"),
            classes=list(classes),
            calibration=_get(obj, "calibration", (dict, type(None)), "", default=None),
            engines=dict(engines),
            source=_get(obj, "source", (dict, type(None)), "", default=None) or {},
            opset=_get(obj, "opset", (int, type(None)), "", default=None),
            gaternet=(None if obj.get("gaternet") is None
                      else GaterNetInfo.parse(obj["gaternet"], "gaternet")),
            quantization=(None if obj.get("quantization") is None
                          else QuantizationInfo.parse(obj["quantization"], "quantization")),
            dgconvert_version=str(obj.get("dgconvert_version", "?")),
            created=str(obj.get("created", "")),
            extra=_rest(obj, _TOP),
        )
        m.check()
        return m

    def check(self) -> None:
        """Consistency between the parts (counts, indices)."""
        if self.num_classes < 1:
            raise BundleError(f"manifest num_classes is {self.num_classes}; expected >= 1. {FIX}")
        if self.classes and len(self.classes) != self.num_classes:
            raise BundleError(f"manifest names {len(self.classes)} classes for num_classes "
                              f"{self.num_classes}. {FIX}")
        if len(self.thresholds.values) != self.num_gates:
            raise BundleError(f"manifest has {len(self.thresholds.values)} thresholds for "
                              f"{self.num_gates} gates. {FIX}")
        for k, s in enumerate(self.stages):
            if s.index != k:
                raise BundleError(f"manifest stages[{k}].index is {s.index}; expected {k}. {FIX}")
            if (s.gate is None) != (k == self.num_gates):
                raise BundleError(f"manifest stages[{k}].gate is {s.gate}; every stage but the "
                                  f"last has a gate. {FIX}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "schema_version": self.schema_version,
            "dgconvert_version": self.dgconvert_version, "created": self.created,
            "input": self.input.to_dict(), "classes": list(self.classes),
            "num_classes": self.num_classes, "stages": [s.to_dict() for s in self.stages],
            "full": self.full.to_dict(), "thresholds": self.thresholds.to_dict(),
            "source": dict(self.source), "opset": self.opset,
            **({"gaternet": self.gaternet.to_dict()} if self.gaternet is not None else {}),
            **({"quantization": self.quantization.to_dict()}
               if self.quantization is not None else {}),
            **self.extra,
            "calibration": self.calibration, "engines": dict(self.engines),
        }

    def dumps(self) -> str:
        """The JSON text (standard JSON only: NaN/inf are refused)."""
        try:
            return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        except ValueError as exc:
            raise BundleError(f"the manifest holds a NaN or infinite number ({exc}); expected "
                              "finite numbers (+inf thresholds are written as null)") from exc

    def copy(self) -> Manifest:
        return copy.deepcopy(self)

    def updated(self, fn: Callable[[Manifest], None]) -> Manifest:
        """A checked copy with ``fn`` applied (``fn`` mutates the copy it is given)."""
        new = self.copy()
        fn(new)
        return Manifest.parse(json.loads(new.dumps()))
