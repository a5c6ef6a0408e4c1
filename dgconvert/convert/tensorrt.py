"""ONNX stage graphs -> one serialized TensorRT engine per stage (``dgconvert build``).

Engines go to ``MODEL.dg/engines/<key>/stageN.engine`` (+ ``full.engine``), ``<key>`` naming
the GPU and TensorRT version (:func:`dgconvert.runtime.tensorrt_backend.engine_key`); the
directory appears atomically and the manifest records each engine with its profile,
precision, size and SHA-256 (:func:`engine_record`), written atomically.

Optimisation profiles (:func:`stage_profiles`): stage 0 has one dynamic dim (``N`` of
``images``); stage k >= 1 has two (``N`` of ``x``, the previous stage's rows, and ``M`` of
``keep``, the rows continuing). ``min`` is 1 for both: the runner never runs a stage that no
row reaches (it skips it), so ``M = 0`` is never executed and a profile starting at 1 lets
TensorRT pick kernels without an empty-batch corner. ``max`` is ``--max-batch``; ``opt`` of
stage k follows the expected survivors (calibrated exit shares x opt batch) when the
manifest's ``calibration.exit_fractions`` is present, else the opt batch.

Precision (:func:`precision_plan`), by TensorRT major version:

====== =============================================== ==============================================
        TensorRT 10 (weakly typed)                      TensorRT 11+ (strongly typed only)
====== =============================================== ==============================================
fp32    FP32 graph, no flags (TF32 allowed)             FP32 graph
fp16    FP32 graph + ``BuilderFlag.FP16``               FP16 graph (:func:`~dgconvert.convert.precision.convert_to_fp16`)
int8    ``BuilderFlag.INT8`` (+FP16) and an             Q/DQ graph from ModelOpt PTQ
        ``IInt8EntropyCalibrator2`` fed from ``--data``  (:func:`~dgconvert.convert.precision.quantize_int8`) on ``--data``
====== =============================================== ==============================================

TensorRT 11 removed ``BuilderFlag.FP16/INT8``, ``IBuilderConfig.int8_calibrator`` and the
calibration profile APIs (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html,
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html).

Builder calls follow the TensorRT Python API (https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/):
``Builder(logger)``, ``create_network(flags)``, ``create_builder_config()``,
``create_optimization_profile()``, ``build_serialized_network(network, config) -> IHostMemory``
(infer/Core/Builder.html, infer/FoundationalTypes/HostMemory.html);
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (infer/Core/Builder.html);
``IOptimizationProfile.set_shape(name, min, opt, max)`` (infer/Core/OptimizationProfile.html);
``IBuilderConfig.set_flag / clear_flag(BuilderFlag.TF32) /
set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) /
add_optimization_profile / int8_calibrator / set_calibration_profile / create_timing_cache /
set_timing_cache / get_timing_cache`` and ``ITimingCache.serialize`` (infer/Core/BuilderConfig.html);
``OnnxParser(network, logger).parse(bytes)``, ``num_errors``, ``get_error(i)``
(parsers/Onnx/pyOnnx.html); ``IInt8EntropyCalibrator2.get_batch_size / get_batch(names) /
read_calibration_cache / write_calibration_cache`` (infer/Int8/EntropyCalibrator2.html).
``Builder(logger)`` returning nullptr (CUDA cannot start) becomes a
:class:`~dgconvert.core.errors.BackendUnavailableError` with a driver hint
(:func:`~dgconvert.runtime.tensorrt_backend.create_trt_object`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BackendUnavailableError, BundleError, DGConvertError
from dgconvert.core.exits import ExitRule
from dgconvert.core.io import atomic_directory, atomic_write
from dgconvert.core.manifest import Manifest, now_iso
from dgconvert.runtime.tensorrt_backend import (
    create_trt_object,
    import_tensorrt,
    local_engine_key,
    trt_version_tuple,
)

PRECISIONS = ("fp32", "fp16", "int8")
log = logging.getLogger(__name__)
MIN_TRT_MAJOR = 10


class BuildError(DGConvertError, ValueError):
    """A ``dgconvert build`` request cannot be satisfied as given (options, data)."""


# -- precision plan ------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionPlan:
    """How to get ``precision`` out of TensorRT ``trt_major`` (see the module docstring)."""

    precision: str
    trt_major: int
    graph: str  # ONNX graph handed to the parser: "fp32" | "fp16" | "int8-qdq"
    builder_flags: tuple[str, ...] = ()  # names of tensorrt.BuilderFlag members to set
    strongly_typed: bool = False  # create the network with STRONGLY_TYPED
    calibrator: str | None = None  # "entropy2": IInt8EntropyCalibrator2 fed from --data
    needs_data: bool = False
    requires: tuple[str, ...] = ()  # pip packages needed beyond tensorrt + cuda-python

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["builder_flags"], d["requires"] = list(self.builder_flags), list(self.requires)
        return d


def precision_plan(trt_major: int, precision: str) -> PrecisionPlan:
    """Pick builder flags or a graph rewrite for ``precision`` on TensorRT ``trt_major``."""
    if precision not in PRECISIONS:
        raise BuildError(
            f"precision {precision!r} is not supported; expected one of {', '.join(PRECISIONS)} "
            "(e.g. --precision fp16)."
        )
    if trt_major < MIN_TRT_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {trt_major}.x is installed; dgconvert needs TensorRT {MIN_TRT_MAJOR} or newer "
            "(named-tensor API, execute_async_v3, int64 I/O). Fix: pip install -U 'tensorrt>=10'."
        )
    strong = trt_major >= 11
    if precision == "fp32":
        return PrecisionPlan("fp32", trt_major, "fp32", strongly_typed=strong)
    if precision == "fp16":
        if strong:
            return PrecisionPlan("fp16", trt_major, "fp16", strongly_typed=True, requires=("onnx",))
        return PrecisionPlan("fp16", trt_major, "fp32", builder_flags=("FP16",))
    if strong:
        return PrecisionPlan("int8", trt_major, "int8-qdq", strongly_typed=True, needs_data=True,
                             requires=("onnx", "nvidia-modelopt[onnx]"))
    return PrecisionPlan("int8", trt_major, "fp32", builder_flags=("INT8", "FP16"),
                         calibrator="entropy2", needs_data=True)


# -- optimisation profiles -----------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRange:
    """``min``/``opt``/``max`` of one input for ``IOptimizationProfile.set_shape``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def check_exit_fractions(values: Any, num_stages: int) -> list[float]:
    """Validate calibrated exit shares: ``num_stages`` non-negative numbers summing to 1."""
    try:
        fr = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise BundleError(f"calibration.exit_fractions is {values!r}; expected a list of numbers") from exc
    if len(fr) != num_stages or any(not math.isfinite(v) or v < 0 for v in fr) or abs(sum(fr) - 1) > 1e-3:
        raise BundleError(
            f"calibration.exit_fractions is {fr}; expected {num_stages} non-negative shares "
            "(one per exit point, the last for the final stage) summing to 1. Fix: re-run "
            "`dgconvert calibrate`, or drop the calibration record."
        )
    return fr


def expected_rows(batch: int, exit_fractions: Sequence[float] | None, num_stages: int) -> list[int]:
    """Rows each stage is expected to process for a batch of ``batch``: ``batch`` times the
    share of samples that did not exit before it (at least 1)."""
    if exit_fractions is None:
        return [batch] * num_stages
    reach = ExitRule.reach(np.asarray(exit_fractions[:num_stages], np.float64), total=1.0)
    return [max(1, min(batch, round(batch * float(r)))) for r in reach]


def stage_profiles(
    stage_inputs: Sequence[Sequence[dict[str, Any]]],
    max_batch: int,
    opt_batch: int,
    exit_fractions: Sequence[float] | None = None,
    min_batch: int = 1,
) -> list[dict[str, ShapeRange]]:
    """One profile per stage from the manifest's ``stages[k]["inputs"]`` (dim 0 dynamic).

    ``images``/``x`` take ``N`` (rows of the previous stage), ``keep`` takes ``M`` (rows of
    this stage); ``opt`` follows :func:`expected_rows` of ``opt_batch``.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BuildError(
            f"batch sizes must satisfy 1 <= min ({min_batch}) <= opt ({opt_batch}) <= max "
            f"({max_batch}). Fix: pass --opt-batch <= --max-batch."
        )
    rows = expected_rows(opt_batch, exit_fractions, len(stage_inputs))
    out = []
    for k, inputs in enumerate(stage_inputs):
        prof = {}
        for spec in inputs:
            name, sample = spec["name"], [int(d) for d in spec["shape"][1:]]
            if k == 0 or name != CONTRACT.keep:
                opt = rows[max(k - 1, 0)]
            else:
                opt = rows[k]
            opt = max(min_batch, min(opt, max_batch))
            prof[name] = ShapeRange((min_batch, *sample), (opt, *sample), (max_batch, *sample))
        out.append(prof)
    return out


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1024"`` (MiB) -> bytes; ``None`` stays None."""
    if text is None:
        return None
    if isinstance(text, int):
        return text * 2**20
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise BuildError(f"size {text!r} is not understood; expected e.g. 512M, 4G or 1024 (MiB)")
    value, unit = float(m.group(1)), m.group(2) or "m"
    return int(value * 2 ** {"k": 10, "m": 20, "g": 30, "t": 40}[unit])


def engine_record(
    *, gpu: Any, trt_version: str, plan: PrecisionPlan, max_batch: int, opt_batch: int,
    workspace: int | None, exit_fractions: Sequence[float] | None,
    stages: list[dict[str, Any]], full: dict[str, Any] | None, tf32: bool = True,
) -> dict[str, Any]:
    """The manifest record for one engine set (``manifest["engines"][key]``)."""
    from dgconvert.core.version import __version__

    return {
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": str(trt_version),
        "precision": plan.precision,
        "plan": plan.as_dict(),
        "max_batch": int(max_batch),
        "opt_batch": int(opt_batch),
        "workspace_bytes": workspace,
        "tf32": tf32,
        "exit_fractions": list(exit_fractions) if exit_fractions is not None else None,
        "stages": stages,
        "full": full,
        "built": now_iso(),
        "dgconvert_version": __version__,
    }


def file_record(bundle_path: Path, data: bytes, final: Path, profile: dict[str, ShapeRange],
                index: int | None) -> dict[str, Any]:
    """Manifest entry of one engine file: its final path (relative to the bundle), size,
    SHA-256 (of the engine ``data`` written there) and profile."""
    rec: dict[str, Any] = {} if index is None else {"index": index}
    rec.update({
        "file": final.relative_to(bundle_path).as_posix(),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "profile": {n: r.as_dict() for n, r in profile.items()},
    })
    return rec


# -- graph preparation (CPU) -----------------------------------------------------------------
def prepare_graph(onnx_path: Path, plan: PrecisionPlan, calibration: dict[str, np.ndarray] | None = None,
                  workdir: Path | None = None) -> bytes:
    """The serialized ONNX graph handed to TensorRT's parser for ``plan`` (runs on the CPU).

    ``fp32``: the file as is; ``fp16``: :func:`convert_to_fp16`; ``int8-qdq``: ModelOpt PTQ on
    ``calibration`` (written under ``workdir``).
    """
    if plan.graph == "fp32":
        return Path(onnx_path).read_bytes()
    if plan.graph == "fp16":
        try:
            import onnx
        except ImportError as exc:
            raise BackendUnavailableError("FP16 graphs need the onnx package. Fix: pip install onnx") from exc
        from dgconvert.convert.precision import convert_to_fp16

        return convert_to_fp16(onnx.load(str(onnx_path))).SerializeToString()
    if plan.graph == "int8-qdq":
        from dgconvert.convert.precision import quantize_int8

        if calibration is None or workdir is None:
            raise BuildError("INT8 (Q/DQ) needs calibration inputs; pass --data")
        out = quantize_int8(Path(onnx_path), calibration, workdir / f"{Path(onnx_path).stem}.int8.onnx")
        return out.read_bytes()
    raise BuildError(f"unknown graph kind {plan.graph!r}")


def calibration_images(bundle: Bundle, data: str | np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Up to ``samples`` normalized float32 images from a ``--data`` spec (or an array)."""
    from dgconvert.core.preprocess import prepare_images

    if isinstance(data, str):
        from dgconvert.data import load_dataset

        data = load_dataset(data).images
    x = prepare_images(data, bundle.input_shape, bundle.normalization)
    if len(x) == 0:
        raise BuildError("the calibration data holds no images; pass --data with images")
    if len(x) > samples:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), samples, replace=False))]
    return x


# -- the build ---------------------------------------------------------------------------
@dataclass
class BuildOptions:
    """What ``dgconvert build`` was asked for."""

    precision: str = "fp32"
    max_batch: int = 256
    opt_batch: int | None = None  # default: max_batch
    workspace: int | None = None  # bytes; None = TensorRT's default (device memory)
    timing_cache: Path | None = None
    data: str | np.ndarray | None = None  # INT8 calibration images
    calib_samples: int = 512
    calib_batch: int = 32
    device: int = 0
    full: bool = True  # also build full.onnx (for run_full / benchmarks)
    tf32: bool = True  # False: clear BuilderFlag.TF32 (exact FP32 math, e.g. parity tests)
    log: Callable[[str], None] | None = field(default=None, repr=False)


def check_build_environment(probe_result: Any = None) -> None:
    """Raise one :class:`BackendUnavailableError` listing everything a build lacks here."""
    from dgconvert.runtime.select import probe

    p = probe_result if probe_result is not None else probe()
    missing = []
    if p.trt_version is None:
        missing.append(f"TensorRT ({p.notes.get('tensorrt', 'not installed')})")
    if not p.cuda_python:
        missing.append(f"a working CUDA driver ({p.notes.get('cuda', 'see dgconvert doctor')})"
                       if p.cuda_installed else "cuda-python (pip install cuda-python)")
    if not p.gpus:
        missing.append("an NVIDIA GPU (none visible: check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    if missing:
        raise BackendUnavailableError(
            "`dgconvert build` compiles TensorRT engines for the GPU it runs on and needs: "
            + "; ".join(missing) + ". Fix: run it on the GPU machine that will serve the model "
            "after `pip install tensorrt cuda-python` (`dgconvert doctor` shows what is there); "
            "without a GPU, use the ONNX Runtime backend (no build needed)."
        )


def build_engines(bundle: Bundle | str | Path, options: BuildOptions | None = None) -> dict[str, Any]:
    """Build every stage's engine for this GPU; returns the manifest record written."""
    from dgconvert.runtime import cuda

    opts = options or BuildOptions()
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    check_build_environment()
    log = opts.log or (lambda _msg: None)
    opt_batch = opts.opt_batch or opts.max_batch
    if opts.max_batch < 1:
        raise BuildError(f"--max-batch must be >= 1, got {opts.max_batch}")
    trt = import_tensorrt()
    version = str(trt.__version__)
    plan = precision_plan(trt_version_tuple(version)[0], opts.precision)
    if plan.needs_data and opts.data is None:
        raise BuildError(
            f"--precision int8 needs calibration images on TensorRT {version} ({plan.graph} "
            "graph). Fix: pass --data, e.g. --data fashion-mnist:train[:2000]."
        )
    key, gpu, _ = local_engine_key(opts.device)
    cuda.set_device(opts.device)
    calib = (b.manifest.calibration or {}).get("exit_fractions")
    fractions = check_exit_fractions(calib, b.num_stages) if calib is not None else None
    profiles = stage_profiles([[t.to_dict() for t in s.inputs] for s in b.manifest.stages], opts.max_batch,
                              opt_batch, fractions)
    full_profile = {CONTRACT.images: ShapeRange((1, *b.input_shape), (opt_batch, *b.input_shape),
                                         (opts.max_batch, *b.input_shape))}
    calib_inputs: list[dict[str, np.ndarray]] | None = None
    if plan.needs_data:
        from dgconvert.convert.precision import stage_calibration_inputs

        images = calibration_images(b, opts.data, opts.calib_samples)  # type: ignore[arg-type]
        calib_inputs = stage_calibration_inputs(b, images)
        log(f"calibration: {len(images)} images through {b.num_stages} stages (FP32, CPU)")
    log(f"building {plan.precision} engines for {gpu.name} ({gpu.sm}), TensorRT {version} -> {key}")
    target = b.path / "engines" / key
    builder = _Builder(trt, plan, opts, log)
    stages: list[dict[str, Any]] = []
    full_rec = None
    with atomic_directory(target, force=True) as tmp:
        jobs: list[tuple[str, Path, dict[str, ShapeRange], dict[str, np.ndarray] | None]] = [
            (f"stage{k}", b.stage_file(k), profiles[k], calib_inputs[k] if calib_inputs else None)
            for k in range(b.num_stages)
        ]
        if opts.full:
            jobs.append(("full", b.full_file(), full_profile, calib_inputs[0] if calib_inputs else None))
        for name, onnx_path, prof, cal in jobs:
            graph = prepare_graph(onnx_path, plan, cal, tmp)
            data = builder.build(name, graph, prof, cal, target / f"{name}.calib", tmp / f"{name}.calib")
            path = tmp / f"{name}.engine"
            atomic_write(path, lambda p, d=data: p.write_bytes(d))
            log(f"  {name}: {len(data) / 2**20:.1f} MiB")
            final = target / path.name
            if name == "full":
                full_rec = file_record(b.path, data, final, prof, None)
            else:
                stages.append(file_record(b.path, data, final, prof, len(stages)))
        for p in tmp.glob("*.int8.onnx"):
            p.unlink()
        builder.save_timing_cache()
    record = engine_record(gpu=gpu, trt_version=version, plan=plan, max_batch=opts.max_batch,
                           opt_batch=opt_batch, workspace=opts.workspace, exit_fractions=fractions,
                           stages=stages, full=full_rec, tf32=opts.tf32)

    def update(m: Manifest) -> None:
        m.engines = {**m.engines, key: record}

    b.update_manifest(update)
    log(f"wrote {target} and recorded it in {b.path / 'manifest.json'}")
    return record


class _Builder:
    """One TensorRT builder shared by the stages of a build (and its timing cache)."""

    def __init__(self, trt: Any, plan: PrecisionPlan, opts: BuildOptions, log: Callable[[str], None]) -> None:
        self.trt, self.plan, self.opts, self.log = trt, plan, opts, log
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.builder = create_trt_object(trt, "Builder", self.logger)
        self.cache: Any = None

    def _network_flags(self) -> int:
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 1 << int(flag) if self.plan.strongly_typed and flag is not None else 0

    def build(self, name: str, graph: bytes, profile: dict[str, ShapeRange],
              calibration: dict[str, np.ndarray] | None, cache_in: Path, cache_out: Path) -> bytes:
        trt, plan = self.trt, self.plan
        network = self.builder.create_network(self._network_flags())
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(graph):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(
                f"TensorRT {trt.__version__} could not parse {name} ({plan.graph} graph): {errors}. "
                "Fix: check the ops against TensorRT's ONNX support, or try --precision fp32."
            )
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if sorted(names) != sorted(profile):
            raise BundleError(f"{name} has inputs {names}; the profile covers {sorted(profile)}")
        config = self.builder.create_builder_config()
        if self.opts.workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.opts.workspace))
        for flag in plan.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        prof = self.builder.create_optimization_profile()
        for inp, r in profile.items():
            prof.set_shape(inp, r.min, r.opt, r.max)
        config.add_optimization_profile(prof)
        if not self.opts.tf32:  # TensorRT allows TF32 for FP32 layers unless told not to
            config.clear_flag(trt.BuilderFlag.TF32)
            log.info("%s: BuilderFlag.TF32 cleared (exact FP32)", name)
        calibrator = None
        if plan.calibrator and calibration is not None:
            cal_batches = list(_calibration_batches(calibration, self.opts.calib_batch))
            calibrator = make_entropy_calibrator(trt, cal_batches, cache_in, cache_out)
            config.int8_calibrator = calibrator
            cal_prof = self.builder.create_optimization_profile()
            for inp, arr in cal_batches[0].items():
                prof_shape = tuple(arr.shape)
                cal_prof.set_shape(inp, prof_shape, prof_shape, prof_shape)
            config.set_calibration_profile(cal_prof)
        self._use_timing_cache(config)
        self.log(f"  {name}: building ({plan.precision}, profile "
                 + ", ".join(f"{n} {list(r.min)}..{list(r.max)} opt {r.opt[0]}" for n, r in profile.items()) + ")")
        try:
            serialized = self.builder.build_serialized_network(network, config)
        finally:
            if calibrator is not None:
                calibrator.close()
        if serialized is None:
            raise BundleError(
                f"TensorRT {trt.__version__} failed to build {name} ({plan.precision}); see its log "
                "above. Fix: try a larger --workspace, a smaller --max-batch, or --precision fp32."
            )
        return bytes(memoryview(serialized))

    def _use_timing_cache(self, config: Any) -> None:
        path = self.opts.timing_cache
        if path is None:
            return
        if self.cache is None:
            blob = Path(path).read_bytes() if Path(path).is_file() else b""
            self.cache = config.create_timing_cache(blob)
            self.log(f"timing cache: {path} ({'loaded' if blob else 'new'})")
        config.set_timing_cache(self.cache, False)

    def save_timing_cache(self) -> None:
        if self.cache is not None and self.opts.timing_cache is not None:
            blob = bytes(memoryview(self.cache.serialize()))
            atomic_write(Path(self.opts.timing_cache), lambda p: p.write_bytes(blob))


def _calibration_batches(inputs: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    from dgconvert.convert.precision import calibration_batches

    n = len(next(iter(inputs.values())))
    batches = list(calibration_batches(inputs, min(batch, n)))
    if not batches:
        raise BuildError("no calibration batch could be formed; pass more --data images")
    return batches


def make_entropy_calibrator(trt: Any, batches: list[dict[str, np.ndarray]], cache_in: Path,
                            cache_out: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` (TensorRT 10) that feeds ``batches`` from device buffers."""
    from dgconvert.runtime import cuda

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._it = iter(batches)
            self._bufs: dict[str, cuda.DeviceBuffer] = {}  # allocated by the first get_batch

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is part of each input's shape

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._it)
            except StopIteration:
                self.close()
                return None
            if not self._bufs:
                self._bufs = {n: cuda.DeviceBuffer(a.nbytes) for n, a in batches[0].items()}
            for n in names:
                cuda.memcpy_htod(self._bufs[n].ptr, batch[n])
            return [self._bufs[n].ptr for n in names]

        def read_calibration_cache(self) -> bytes | None:
            if not cache_in.is_file():
                return None
            blob = cache_in.read_bytes()
            # TensorRT writes no cache when it reads one: carry it into the new engine folder
            atomic_write(cache_out, lambda p: p.write_bytes(blob))
            log.info("INT8 calibration table %s reused (no calibration)", cache_in)
            return blob

        def close(self) -> None:
            """Free the device buffers (idempotent; the build calls it whatever happened)."""
            for buf in self._bufs.values():
                buf.free()
            self._bufs = {}

        def write_calibration_cache(self, cache: Any) -> None:
            blob = bytes(memoryview(cache))
            atomic_write(cache_out, lambda p: p.write_bytes(blob))

    return EntropyCalibrator()
