"""TensorRT backend: one serialized engine per stage, activations resident on the GPU.

Engines live in ``MODEL.dg/engines/<key>/stageN.engine`` where ``<key>`` names the GPU and
the TensorRT version (:func:`engine_key`); ``dgconvert build MODEL.dg`` writes them. At load
the engines for *this* GPU and TensorRT version are picked and checked (size, SHA-256, I/O
names, dtypes, stage-to-stage chaining); anything else is a clear error with the rebuild
command.

Execution (named-tensor API, one CUDA stream per thread): stage 0 copies the images in
through a pinned buffer; every stage writes ``features`` into one of two ping-pong device
buffers sized for the profile maximum, and the next stage's engine gathers from it directly
(``x`` is bound to that address). Only ``score`` and ``label`` are copied to pinned host
memory, and only ``keep`` is copied in. :class:`DeviceFeatures` is the handle the runner
passes between stages. Each thread gets its own execution contexts, stream and buffers, so a
:class:`GatedRunner` may be shared by threads.

TensorRT calls, as documented in the TensorRT Python API
(https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/, pages named below):
``Runtime(logger).deserialize_cuda_engine(bytes)`` (infer/Core/Runtime.html);
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
get_tensor_shape / get_tensor_profile_shape / create_execution_context``
(infer/Core/Engine.html); ``IExecutionContext.set_input_shape / set_tensor_address /
execute_async_v3(stream_handle)`` (infer/Core/ExecutionContext.html); ``tensorrt.nptype``.
These are unchanged between TensorRT 10 and 11 (the 11.x Python migration guide,
https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html,
removes weak-typing builder APIs and ``ICudaEngine.device_memory_size``, neither used here).
CUDA through cuda-python, see :mod:`dgconvert.runtime.cuda`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BackendUnavailableError, BundleError, InputError
from dgconvert.runtime import cuda
from dgconvert.runtime.base import Backend, StageOutput

INSTALL = "pip install tensorrt cuda-python"
log = logging.getLogger(__name__)
REBUILD = "dgconvert build {path}"


# -- pure helpers (no TensorRT needed) ---------------------------------------------------
def sanitize_gpu_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"`` (lowercase, [a-z0-9-])."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown-gpu"


def trt_version_tuple(version: str) -> tuple[int, int, int]:
    """``"10.8.0.43" -> (10, 8, 0)``; raises ``ValueError`` for unparsable strings."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"cannot parse TensorRT version {version!r}; expected like '10.8.0'")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def engine_key(gpu_name: str, major: int, minor: int, trt_version: str) -> str:
    """Engine directory name: ``<gpu>_sm<XY>_trt<major>.<minor>``,
    e.g. ``nvidia-h100-80gb-hbm3_sm90_trt10.8``."""
    t = trt_version_tuple(trt_version)
    return f"{sanitize_gpu_name(gpu_name)}_sm{int(major)}{int(minor)}_trt{t[0]}.{t[1]}"


def import_tensorrt() -> Any:
    """``import tensorrt`` with an actionable error when it is missing."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed (the 'tensorrt' backend and `dgconvert build` need it). "
            f"Fix: {INSTALL} on a machine with an NVIDIA GPU, or use backend='onnxruntime'."
        ) from exc
    return tensorrt


#: the oldest Linux driver of each CUDA major
MIN_DRIVER = {12: 525, 13: 580}


def trt_cuda_major(version: str) -> int:
    """The CUDA major the installed TensorRT wheel is built for: ``tensorrt-cu12`` /
    ``tensorrt-cu13`` when one is installed, else the plain ``tensorrt`` default (CUDA 13 from
    TensorRT 11 on, CUDA 12 before)."""
    import importlib.metadata as md

    for major in (13, 12):
        for dist in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}"):
            try:
                md.version(dist)
                return major
            except md.PackageNotFoundError:
                continue
    return 13 if trt_version_tuple(version)[0] >= 11 else 12


def create_trt_object(trt: Any, cls: str, logger: Any) -> Any:
    """``trt.Runtime(logger)`` / ``trt.Builder(logger)``, or a :class:`BackendUnavailableError`
    with a driver hint when TensorRT returns nullptr (CUDA did not start): pybind11 then
    raises ``TypeError: ... factory function returned nullptr``."""
    try:
        obj = getattr(trt, cls)(logger)
    except TypeError as exc:
        if "nullptr" not in str(exc):
            raise
        obj = None
    if obj is None:
        version = str(getattr(trt, "__version__", "0"))
        cm = trt_cuda_major(version)
        raise BackendUnavailableError(
            f"TensorRT {version} could not create its {cls} (it returned nullptr): CUDA did not "
            f"start. This TensorRT {trt_version_tuple(version)[0]}.x is built for CUDA {cm} "
            f"(driver >= {MIN_DRIVER[cm]}); the driver may be older, or no GPU is usable. Fix: "
            "run `dgconvert doctor` to compare the driver and runtime, update the NVIDIA driver, "
            "or install the TensorRT for your driver's CUDA major "
            "(pip install 'dgconvert[gpu-cu12]' or 'dgconvert[gpu-cu13]', docs/gpu.md)."
        )
    return obj


def local_engine_key(device: int = 0) -> tuple[str, cuda.GpuInfo, str]:
    """``(key, gpu, tensorrt version)`` for this machine's GPU ``device``."""
    trt = import_tensorrt()
    gpu = cuda.current_gpu(device)
    return engine_key(gpu.name, gpu.major, gpu.minor, trt.__version__), gpu, trt.__version__


def engine_record_for(bundle: Bundle, key: str, trt_version: str) -> dict[str, Any]:
    """The manifest's engine record for ``key``, checked against this TensorRT version."""
    engines = bundle.manifest.engines
    fix = REBUILD.format(path=bundle.path)
    if key not in engines:
        have = ", ".join(engines) or "none"
        raise BundleError(
            f"{bundle.path} has no TensorRT engines for this GPU and TensorRT version (key {key!r}); "
            f"engines built: {have}. Engines are specific to the GPU model and TensorRT version. "
            f"Fix: run `{fix}` on this machine, or use backend='onnxruntime'."
        )
    rec = engines[key]
    built = str(rec.get("tensorrt", "?"))
    if built != str(trt_version):
        raise BundleError(
            f"engines {key!r} were built with TensorRT {built}, this is TensorRT {trt_version}; "
            f"serialized engines only load in the exact version that built them. Fix: `{fix}`."
        )
    return rec


@dataclass
class DeviceFeatures:
    """Handle to a stage's ``features`` on the GPU (what ``StageOutput.features`` holds).

    Valid until the next ``run_stage`` call of the same thread: the buffer is reused.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stage: int
    generation: int
    owner: _Workspace = field(repr=False)

    def to_host(self) -> np.ndarray:
        """Copy the features to a host array (debugging and tests; the runner never does)."""
        if self.owner.generation != self.generation:
            raise InputError("features handle is stale (its buffer was reused by a later stage)")
        self.owner.stream.synchronize()
        return cuda.memcpy_dtoh(np.empty(self.shape, self.dtype), self.ptr)


@dataclass
class _Engine:
    """One deserialized engine and its I/O description."""

    engine: Any
    inputs: dict[str, tuple[np.dtype, tuple[int, ...]]]  # name -> (dtype, static sample shape)
    outputs: dict[str, tuple[np.dtype, tuple[int, ...]]]
    max_rows: int


class _Workspace:
    """Per-thread contexts, stream and buffers."""

    def __init__(self, backend: TensorRTBackend) -> None:
        cuda.set_device(backend.device)
        self.stream = cuda.Stream()
        self.generation = 0
        self._bufs: list[Any] = []
        self.contexts = [e.engine.create_execution_context() for e in backend._engines]
        self.full_context = None
        mb = backend._max
        d, p = self._device, self._pinned
        images = backend._engines[0].inputs[CONTRACT.images]
        self.images_d, self.images_h = d(mb * _bytes(images)), p(mb * _bytes(images))
        keep_sizes = [e.inputs[CONTRACT.keep][0].itemsize for e in backend._engines[1:]] or [8]
        self.keep_d, self.keep_h = d(mb * max(keep_sizes)), p(mb * max(keep_sizes))
        feats = [_bytes(e.outputs[CONTRACT.features]) for e in backend._engines[:-1]]
        self.features = [d(mb * max(feats)), d(mb * max(feats))]  # ping-pong
        engines = [*backend._engines, *([backend._full] if backend._full else [])]
        outs = [(n, s) for e in engines for n, s in e.outputs.items() if n != CONTRACT.features]
        small = max(_bytes(s) for _, s in outs)
        self.score_d, self.label_d = d(mb * 8), d(mb * 8)
        self.score_h, self.label_h = p(mb * 8), p(mb * 8)
        self.scratch = d(mb * small)  # outputs nobody reads (gate_logits)
        self.logits_h = p(mb * small)

    def _device(self, nbytes: int) -> cuda.DeviceBuffer:
        b = cuda.DeviceBuffer(nbytes)
        self._bufs.append(b)
        return b

    def _pinned(self, nbytes: int) -> cuda.PinnedBuffer:
        b = cuda.PinnedBuffer(nbytes)
        self._bufs.append(b)
        return b

    def free(self) -> None:
        """Wait for the stream's pending work (a failed call may leave copies queued), then
        free the buffers and the stream."""
        if self.stream.handle is not None:
            self.stream.synchronize()
        self.contexts, self.full_context = [], None
        for b in self._bufs:
            b.free()
        self._bufs = []
        self.stream.destroy()


def _bytes(spec: tuple[np.dtype, tuple[int, ...]]) -> int:
    """Bytes of one sample (row) of a tensor; its sample dims must be known (>= 0)."""
    dtype, shape = spec
    if any(int(d) < 0 for d in shape):
        raise BundleError(
            f"a tensor has sample shape {list(shape)} with a dynamic (-1) dimension beyond the "
            "batch; expected static sample dimensions (dgconvert sizes its buffers from them). "
            "Fix: re-export the bundle with static image dimensions."
        )
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class TensorRTBackend(Backend):
    """Runs the bundle's TensorRT engines for this GPU (see the module docstring).

    ``device`` picks the GPU; ``key`` overrides the engine set (default: this GPU's).
    ``threads`` is accepted for interface compatibility and ignored.
    """

    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: int = 0, key: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__(bundle)
        self._trt = trt = import_tensorrt()
        self.device = int(device)
        local_key, self.gpu, version = local_engine_key(self.device)
        cuda.set_device(self.device)
        self.key = key or local_key
        self.record = engine_record_for(bundle, self.key, version)
        stages = self.record.get("stages") or []
        if len(stages) != bundle.num_stages:
            raise BundleError(
                f"engine set {self.key!r} has {len(stages)} engines for {bundle.num_stages} stages; "
                f"the bundle changed since the build. Fix: `{REBUILD.format(path=bundle.path)}`."
            )
        self._runtime = create_trt_object(trt, "Runtime", trt.Logger(trt.Logger.WARNING))
        self._engines = [self._load(s, k) for k, s in enumerate(stages)]
        self._full = self._load(self.record["full"], -1) if self.record.get("full") else None
        self._check_chain()
        self._max = min(e.max_rows for e in self._engines)
        self._local = threading.local()
        self._workspaces: list[_Workspace] = []
        self._lock = threading.Lock()
        self._fallback: Backend | None = None

    # -- loading -------------------------------------------------------------------------
    def _load(self, rec: dict[str, Any], k: int) -> _Engine:
        trt, fix = self._trt, REBUILD.format(path=self.bundle.path)
        what = "full model" if k < 0 else f"stage {k}"
        path = self.bundle.resolve(rec.get("file"), f"engines[{self.key!r}] {what} file")
        if not path.is_file():
            raise BundleError(f"engine file {path} ({what}) is missing. Fix: `{fix}`.")
        data = path.read_bytes()  # read once: checked, then deserialized
        if rec.get("bytes") is not None and len(data) != int(rec["bytes"]):
            raise BundleError(f"engine file {path} has {len(data)} bytes, the manifest "
                              f"recorded {rec['bytes']}: it changed since the build. Fix: `{fix}`.")
        if rec.get("sha256") and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise BundleError(f"engine file {path} does not match its SHA-256 in the manifest "
                              f"(corrupt or replaced). Fix: `{fix}`.")
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} could not deserialize {path} ({what}); it was built "
                f"for another GPU or TensorRT version. Fix: `{fix}`."
            )
        inputs, outputs, max_rows = {}, {}, None
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(s) for s in engine.get_tensor_shape(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                hi_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[2])
                # a dynamic (-1) sample dim takes the profile's maximum: buffers fit any shape
                sample = tuple(h if d < 0 else d for d, h in zip(shape[1:], hi_shape[1:],
                                                                  strict=True))
                if sample != shape[1:]:
                    log.info("%s input %s: dynamic sample dims %s sized from the profile "
                             "maximum %s", what, name, list(shape[1:]), list(sample))
                inputs[name] = (dtype, sample)
                max_rows = hi_shape[0] if max_rows is None else min(max_rows, hi_shape[0])
            else:
                outputs[name] = (dtype, shape[1:])
                if any(d < 0 for d in shape[1:]):
                    raise BundleError(
                        f"engine {path} ({what}) output {name!r} has shape {list(shape)}: a "
                        "dynamic dimension beyond the batch; expected static sample "
                        f"dimensions (the buffers are sized from them). Fix: re-export the "
                        f"bundle with static image dimensions, then `{fix}`."
                    )
        last = self.bundle.num_stages - 1
        want_in = {CONTRACT.images} if k <= 0 else {CONTRACT.x, CONTRACT.keep}
        want_out = {CONTRACT.logits} if k < 0 else {CONTRACT.score, CONTRACT.label} | ({CONTRACT.features} if k < last else set())
        if set(inputs) != want_in or not want_out <= set(outputs):
            raise BundleError(
                f"engine {path} ({what}) has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"expected inputs {sorted(want_in)} and outputs including {sorted(want_out)}. "
                f"Fix: `{fix}`."
            )
        return _Engine(engine, inputs, outputs, int(max_rows or 1))

    def _check_chain(self) -> None:
        for k in range(1, len(self._engines)):
            out = self._engines[k - 1].outputs[CONTRACT.features]
            inp = self._engines[k].inputs[CONTRACT.x]
            if out != inp:
                raise BundleError(
                    f"stage {k - 1} engine writes features {out[0]} {list(out[1])} but stage {k} "
                    f"reads x {inp[0]} {list(inp[1])}; the engines were built from different "
                    f"bundles or precisions. Fix: `{REBUILD.format(path=self.bundle.path)}`."
                )

    # -- execution -------------------------------------------------------------------------
    def _ws(self) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            if self._engines is None:
                raise BackendUnavailableError("this TensorRT backend was closed; create a new runner")
            ws = _Workspace(self)
            self._local.ws = ws
            with self._lock:
                self._workspaces.append(ws)
        return ws

    def _check_rows(self, rows: int, what: str) -> None:
        if rows > self._max:
            raise InputError(
                f"{what} has {rows} rows but the engines {self.key!r} accept at most {self._max} "
                f"(their optimisation profile maximum). Fix: split the batch (GatedRunner does, "
                f"with max_batch <= {self._max}) or rebuild with `dgconvert build "
                f"{self.bundle.path} --max-batch {rows}`."
            )

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        ws = self._ws()
        eng, ctx = self._engines[k], ws.contexts[k]
        if k == 0:
            rows = self._bind_images(ws, ctx, eng, inputs)
        else:
            rows = self._bind_gather(ws, ctx, eng, k, inputs, keep)
        last = k == len(self._engines) - 1
        addresses = {CONTRACT.score: ws.score_d.ptr, CONTRACT.label: ws.label_d.ptr}
        if not last:
            addresses[CONTRACT.features] = ws.features[k % 2].ptr
        for name in eng.outputs:
            if not ctx.set_tensor_address(name, addresses.get(name, ws.scratch.ptr)):
                raise BackendUnavailableError(f"TensorRT refused the address of output {name!r} (stage {k})")
        if not ctx.execute_async_v3(ws.stream.ptr):
            raise BackendUnavailableError(
                f"TensorRT execution of stage {k} failed ({rows} rows); see the TensorRT log above."
            )
        score, label = self._fetch(ws, eng, rows)
        ws.generation += 1
        feats = None
        if not last:
            dtype, sample = eng.outputs[CONTRACT.features]
            feats = DeviceFeatures(ws.features[k % 2].ptr, (rows, *sample), dtype, k, ws.generation, ws)
        return StageOutput(feats, score, label)

    def _bind_images(self, ws: _Workspace, ctx: Any, eng: _Engine, images: Any) -> int:
        dtype, sample = eng.inputs[CONTRACT.images]
        x = np.asarray(images)
        if x.ndim != len(sample) + 1 or tuple(x.shape[1:]) != sample:
            raise InputError(f"images have shape {tuple(x.shape)}, expected [N, {', '.join(map(str, sample))}]")
        n = len(x)
        if n < 1:
            raise InputError("got 0 images; expected at least 1 (GatedRunner skips empty batches)")
        self._check_rows(n, "the image batch")
        host = ws.images_h.view(dtype, x.size)
        host[:] = x.reshape(-1)
        ws.stream.htod(ws.images_d.ptr, ws.images_h.ptr, host.nbytes)
        self._bind(ctx, CONTRACT.images, x.shape, ws.images_d.ptr)
        return n

    def _bind_gather(self, ws: _Workspace, ctx: Any, eng: _Engine, k: int, feats: Any,
                     keep: np.ndarray | None) -> int:
        if not isinstance(feats, DeviceFeatures):
            raise InputError(
                f"stage {k} got {type(feats).__name__} as its input; expected the DeviceFeatures "
                f"handle returned by stage {k - 1} of the same TensorRT backend."
            )
        if feats.owner is not ws or feats.generation != ws.generation or feats.stage != k - 1:
            raise InputError(
                f"stage {k} got a stale features handle (from stage {feats.stage}, another thread "
                f"or an earlier call); pass the features of stage {k - 1} returned by the "
                "immediately preceding run_stage call of this thread."
            )
        idx = np.asarray(keep)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise InputError(f"keep must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        m = len(idx)
        if m < 1:
            raise InputError(f"keep is empty for stage {k}; expected >= 1 row (skip the stage instead)")
        self._check_rows(m, f"keep (stage {k})")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= feats.shape[0]:
            raise InputError(
                f"keep indices span {lo}..{hi} but stage {k - 1} produced {feats.shape[0]} rows; "
                f"expected indices in 0..{feats.shape[0] - 1}."
            )
        kdtype = eng.inputs[CONTRACT.keep][0]
        host = ws.keep_h.view(kdtype, m)
        host[:] = idx
        ws.stream.htod(ws.keep_d.ptr, ws.keep_h.ptr, host.nbytes)
        self._bind(ctx, CONTRACT.x, feats.shape, feats.ptr)
        self._bind(ctx, CONTRACT.keep, (m,), ws.keep_d.ptr)
        return m

    @staticmethod
    def _bind(ctx: Any, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not ctx.set_input_shape(name, tuple(int(s) for s in shape)):
            raise InputError(f"TensorRT rejected shape {tuple(shape)} for input {name!r}")
        if not ctx.set_tensor_address(name, ptr):
            raise BackendUnavailableError(f"TensorRT refused the address of input {name!r}")

    def _fetch(self, ws: _Workspace, eng: _Engine, rows: int) -> tuple[np.ndarray, np.ndarray]:
        sdt, ldt = eng.outputs[CONTRACT.score][0], eng.outputs[CONTRACT.label][0]
        ws.stream.dtoh(ws.score_h.ptr, ws.score_d.ptr, rows * sdt.itemsize)
        ws.stream.dtoh(ws.label_h.ptr, ws.label_d.ptr, rows * ldt.itemsize)
        ws.stream.synchronize()
        score = ws.score_h.view(sdt, rows).astype(np.float32, copy=True)
        label = ws.label_h.view(ldt, rows).astype(np.int64, copy=True)
        return score, label

    def run_full(self, images: np.ndarray) -> np.ndarray:
        if self._full is None:  # engines built without full.engine: fall back to ONNX Runtime
            if self._fallback is None:
                from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend

                self._fallback = OnnxRuntimeBackend(self.bundle)
            return self._fallback.run_full(images)
        ws = self._ws()
        if ws.full_context is None:
            ws.full_context = self._full.engine.create_execution_context()
        ctx, eng = ws.full_context, self._full
        n = self._bind_images(ws, ctx, eng, images)
        ldt, lshape = eng.outputs[CONTRACT.logits]
        for name in eng.outputs:
            if not ctx.set_tensor_address(name, ws.scratch.ptr if name == CONTRACT.logits else ws.score_d.ptr):
                raise BackendUnavailableError(
                    f"TensorRT refused the address of output {name!r} of the full model; "
                    "see the TensorRT log above."
                )
        if not ctx.execute_async_v3(ws.stream.ptr):
            raise BackendUnavailableError("TensorRT execution of the full model failed")
        count = n * int(np.prod(lshape, dtype=np.int64))
        ws.stream.dtoh(ws.logits_h.ptr, ws.scratch.ptr, count * ldt.itemsize)
        ws.stream.synchronize()
        ws.generation += 1
        return ws.logits_h.view(ldt, count).astype(np.float32).reshape(n, *lshape)

    def max_batch(self) -> int | None:
        return self._max

    def describe(self) -> str:
        return (
            f"tensorrt {self._trt.__version__} on {self.gpu.name} ({self.gpu.sm}), "
            f"{self.record.get('precision', '?')}, engines {self.key}, max batch {self._max}"
        )

    def close(self) -> None:
        with self._lock:
            for ws in self._workspaces:
                ws.free()
            self._workspaces = []
        self._local = threading.local()
        if self._fallback is not None:
            self._fallback.close()
        self._engines, self._full = None, None  # type: ignore[assignment]
