"""Strict fakes of ``tensorrt`` (10 and 11) and ``cuda.bindings.runtime`` for CPU tests.

TensorRT cannot be installed without a GPU, so its Python API is faked here; the CUDA side
uses the real ``cuda-bindings`` types (``cudaError_t``, ``cudaMemcpyKind``, ``cudaStream_t``)
so handle and error-tuple semantics are the real ones. The fakes are strict where a real
GPU would punish a mistake silently:

- streams are asynchronous: ``cudaMemcpyAsync`` and ``execute_async_v3`` only enqueue; the
  work runs, in order, at ``cudaStreamSynchronize`` (or ``cudaStreamDestroy``/``cudaMemcpy``);
- every stream has its own handle (``cudaStream_t(0x5eed00 + k)``); ``execute_async_v3``
  asserts it got ``int(handle)`` of a live stream, not e.g. ``handle.getPtr()``;
- device memory (``cudaMalloc``/``cudaFree``) and pinned memory
  (``cudaMallocHost``/``cudaFreeHost``) are separate: freeing with the wrong call, copying
  from/to the wrong kind or past the end of an allocation is an error, as is an engine
  reading or writing outside device memory, or freeing while stream work is still queued;
- TensorRT 11 lacks what 11.x removed: ``BuilderFlag.FP16/INT8``,
  ``IInt8EntropyCalibrator2``, ``IBuilderConfig.int8_calibrator`` /
  ``set_calibration_profile`` and ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``.

"Device" memory is host memory (ctypes buffers) and an engine executes the ONNX graph it
was "built" from with ONNX Runtime (CPU).
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

real_rt = pytest.importorskip("cuda.bindings.runtime", reason="pip install cuda-bindings (dev extra)")

GPU_NAME = "NVIDIA Fake GPU 80GB HBM3"
Err = real_rt.cudaError_t
Kind = real_rt.cudaMemcpyKind
ALIGN = 256  # cudaMalloc returns 256-byte aligned pointers
STREAM_BASE = 0x5EED00
NULLPTR = "pybind11::init(): factory function returned nullptr"


class FakeCudaRuntime(types.ModuleType):
    """``cuda.bindings.runtime`` over host memory, with asynchronous streams."""

    cudaError_t = Err
    cudaMemcpyKind = Kind
    cudaStream_t = real_rt.cudaStream_t

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.__spec__ = importlib.machinery.ModuleSpec(self.__name__, None)  # find_spec works
        self.device: dict[int, tuple[Any, int]] = {}  # aligned ptr -> (buffer, nbytes)
        self.pinned: dict[int, tuple[Any, int]] = {}
        self.streams: dict[int, list[Callable[[], None]]] = {}
        self.created_streams: list[int] = []
        self.copies: list[tuple[int, int]] = []  # (kind, nbytes) as executed
        self.driver_version, self.runtime_version = 12080, 12060
        self.device_count: tuple[Any, int] = (Err.cudaSuccess, 1)
        self.lock = threading.RLock()

    # -- memory ------------------------------------------------------------------------
    def _alloc(self, table: dict[int, tuple[Any, int]], n: int) -> tuple[Any, int]:
        if int(n) < 1:
            return Err.cudaErrorInvalidValue, 0
        if int(n) > 1 << 36:  # more than this fake's 64 GiB "GPU"
            return Err.cudaErrorMemoryAllocation, 0
        buf = ctypes.create_string_buffer(int(n) + ALIGN)
        ptr = (ctypes.addressof(buf) + ALIGN - 1) // ALIGN * ALIGN
        with self.lock:
            table[ptr] = (buf, int(n))
        return Err.cudaSuccess, ptr

    def cudaMalloc(self, n: int) -> tuple[Any, int]:
        return self._alloc(self.device, n)

    def cudaMallocHost(self, n: int) -> tuple[Any, int]:
        return self._alloc(self.pinned, n)

    def _assert_idle(self, call: str) -> None:
        # cudaFree synchronizes the device; code that frees under queued work relies on that
        # silently, so the fake insists the work was waited for
        assert not self.pending(), (
            f"{call} with {self.pending()} queued stream operation(s): synchronize the stream "
            "before freeing its buffers")

    def cudaFree(self, ptr: int) -> tuple[Any]:
        self._assert_idle("cudaFree")
        with self.lock:
            if int(ptr) not in self.device:  # e.g. a pinned pointer: cudaFreeHost frees those
                return (Err.cudaErrorInvalidValue,)
            del self.device[int(ptr)]
        return (Err.cudaSuccess,)

    def cudaFreeHost(self, ptr: int) -> tuple[Any]:
        self._assert_idle("cudaFreeHost")
        with self.lock:
            if int(ptr) not in self.pinned:
                return (Err.cudaErrorInvalidValue,)
            del self.pinned[int(ptr)]
        return (Err.cudaSuccess,)

    @staticmethod
    def _inside(table: dict[int, tuple[Any, int]], ptr: int, n: int) -> bool:
        return any(p <= ptr and ptr + n <= p + size for p, (_, size) in table.items())

    def check_device(self, ptr: int, n: int, what: str) -> None:
        """Fail the test unless ``[ptr, ptr + n)`` lies inside one live device allocation."""
        with self.lock:
            ok = self._inside(self.device, int(ptr), int(n))
        assert ok, f"{what}: {n} bytes at {int(ptr):#x} are not inside a device allocation"

    def _copy_ok(self, dst: int, src: int, n: int, kind: Any, pinned_only: bool) -> bool:
        host = self.pinned if pinned_only else None
        with self.lock:
            if kind == Kind.cudaMemcpyHostToDevice:
                dev_ok = self._inside(self.device, dst, n)
                host_ok = host is None or self._inside(host, src, n)
            elif kind == Kind.cudaMemcpyDeviceToHost:
                dev_ok = self._inside(self.device, src, n)
                host_ok = host is None or self._inside(host, dst, n)
            else:
                return False
        return dev_ok and host_ok

    # -- streams -----------------------------------------------------------------------
    def cudaStreamCreate(self) -> tuple[Any, Any]:
        with self.lock:
            handle = STREAM_BASE + len(self.created_streams)
            self.created_streams.append(handle)
            self.streams[handle] = []
        return Err.cudaSuccess, real_rt.cudaStream_t(handle)

    def _stream(self, stream: Any) -> int | None:
        if not isinstance(stream, real_rt.cudaStream_t | int):
            return None
        h = int(stream)
        return h if h in self.streams else None

    def enqueue(self, handle: int, op: Callable[[], None], who: str) -> None:
        """Queue ``op`` on the stream whose handle is ``handle`` (asserts it is live)."""
        with self.lock:
            assert handle in self.streams, (
                f"{who} got stream handle {handle:#x}, which is no live stream "
                f"(live: {[hex(h) for h in self.streams]}); pass int(cudaStream_t)")
            self.streams[handle].append(op)

    def _run(self, handle: int) -> None:
        with self.lock:
            ops, self.streams[handle] = self.streams[handle], []
        for op in ops:
            op()

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: Any) -> tuple[Any]:
        h = self._stream(stream)
        if h is None:
            return (Err.cudaErrorInvalidResourceHandle,)
        dst, src, n = int(dst), int(src), int(n)
        if not self._copy_ok(dst, src, n, kind, pinned_only=True):
            return (Err.cudaErrorInvalidValue,)

        def op() -> None:
            ctypes.memmove(dst, src, n)
            self.copies.append((int(kind), n))

        self.enqueue(h, op, "cudaMemcpyAsync")
        return (Err.cudaSuccess,)

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: Any) -> tuple[Any]:
        dst, src, n = int(dst), int(src), int(n)
        if not self._copy_ok(dst, src, n, kind, pinned_only=False):
            return (Err.cudaErrorInvalidValue,)
        for h in list(self.streams):  # the legacy default stream waits for blocking streams
            self._run(h)
        ctypes.memmove(dst, src, n)
        return (Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any]:
        h = self._stream(stream)
        if h is None:
            return (Err.cudaErrorInvalidResourceHandle,)
        self._run(h)
        return (Err.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[Any]:
        h = self._stream(stream)
        if h is None:
            return (Err.cudaErrorInvalidResourceHandle,)
        self._run(h)  # pending work completes before the stream goes
        with self.lock:
            del self.streams[h]
        return (Err.cudaSuccess,)

    # -- devices -----------------------------------------------------------------------
    def cudaSetDevice(self, d: int) -> tuple[Any]:
        return (Err.cudaSuccess,)

    def cudaGetDeviceCount(self) -> tuple[Any, Any]:
        return self.device_count

    def cudaGetDeviceProperties(self, i: int) -> tuple[Any, Any]:
        return Err.cudaSuccess, types.SimpleNamespace(
            name=GPU_NAME.encode() + b"\0\0\0", major=9, minor=0, totalGlobalMem=80 * 2**30)

    def cudaDriverGetVersion(self) -> tuple[Any, int]:
        return Err.cudaSuccess, self.driver_version

    def cudaRuntimeGetVersion(self) -> tuple[Any, int]:
        return Err.cudaSuccess, self.runtime_version

    def pending(self) -> int:
        """Operations enqueued and not yet run."""
        return sum(len(ops) for ops in self.streams.values())


NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}
ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64"}


class FakeTRT(types.ModuleType):
    """Enough of the tensorrt Python API for dgconvert's build and backend.

    ``version`` picks the API: 10.x has the weak-typing flags and the INT8 calibrator,
    11.x does not. Knobs: ``cuda_broken`` (``Runtime``/``Builder`` construction fails as
    pybind11 does when TensorRT returns nullptr), ``refuse_addresses`` (tensor names whose
    ``set_tensor_address`` returns False), ``dynamic_sample_dims`` (engines report -1 for
    the non-batch dims of their inputs, as for a graph with symbolic sample dims).
    """

    def __init__(self, version: str, rt: FakeCudaRuntime) -> None:
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec(self.__name__, None)  # find_spec works
        self.__version__ = version
        self.rt = rt
        self.builds: list[dict[str, Any]] = []
        self.cuda_broken = False
        self.refuse_addresses: set[str] = set()
        self.dynamic_sample_dims = False
        self.executions: list[int] = []  # stream handles execute_async_v3 received
        major = int(version.split(".")[0])
        trt = self
        self.DataType = enum.Enum("DataType", list(NP))
        self.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
        flags = ["FP16", "INT8", "TF32"] if major < 11 else ["TF32"]
        self.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", ["WORKSPACE"])
        net_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major < 11 else {"STRONGLY_TYPED": 1}
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", net_flags)

        class Logger:
            WARNING = 2

            def __init__(self, severity: int = 2) -> None:
                self.severity = severity

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.model, self.inputs = flags, None, []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Any:
                return types.SimpleNamespace(name=self.inputs[i])

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network

            def parse(self, blob: bytes) -> bool:
                m = onnx.load_from_string(bytes(blob))
                self.network.model = m
                inits = {t.name for t in m.graph.initializer}
                self.network.inputs = [i.name for i in m.graph.input if i.name not in inits]
                return True

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Cache:
            def __init__(self, blob: bytes) -> None:
                self.blob = bytes(blob) + b"+"

            def serialize(self) -> bytes:
                return self.blob

        class Config:
            def __init__(self) -> None:
                self.flags: list[str] = []  # set explicitly, in order
                self.tf32 = True  # TensorRT's default
                self.profiles: list[Profile] = []
                self.pool: dict[Any, int] = {}
                self.cache = None

            def set_flag(self, f: Any) -> None:
                if f.name == "TF32":
                    self.tf32 = True
                else:
                    self.flags.append(f.name)

            def clear_flag(self, f: Any) -> None:
                if f.name == "TF32":
                    self.tf32 = False
                elif f.name in self.flags:
                    self.flags.remove(f.name)

            def set_memory_pool_limit(self, pool: Any, n: int) -> None:
                self.pool[pool.name] = n

            def add_optimization_profile(self, p: Profile) -> int:
                self.profiles.append(p)
                return len(self.profiles) - 1

            def create_timing_cache(self, blob: bytes) -> Cache:
                return Cache(blob)

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

        class Config10(Config):
            def __init__(self) -> None:
                super().__init__()
                self.int8_calibrator = None
                self.calibration_profile = None

            def set_calibration_profile(self, p: Profile) -> bool:
                self.calibration_profile = p
                return True

        class Config11(Config):
            """No ``int8_calibrator`` / ``set_calibration_profile`` (removed in 11.x)."""

            def __setattr__(self, name: str, value: Any) -> None:
                if name not in ("flags", "tf32", "profiles", "pool", "cache"):
                    raise AttributeError(f"'IBuilderConfig' object has no attribute {name!r}")
                object.__setattr__(self, name, value)

        config_cls = Config10 if major < 11 else Config11

        class Builder:
            def __init__(self, logger: Logger) -> None:
                if trt.cuda_broken:
                    raise TypeError(NULLPTR)

            def create_network(self, flags: int = 0) -> Network:
                return Network(flags)

            def create_builder_config(self) -> Config:
                return config_cls()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                cal = getattr(config, "int8_calibrator", None)
                batches = 0
                if cal is not None:  # drive the calibrator like TensorRT does
                    assert cal.get_batch_size() >= 1
                    if cal.read_calibration_cache() is None:
                        while (ptrs := cal.get_batch(list(network.inputs))) is not None:
                            assert len(ptrs) == len(network.inputs) and all(ptrs)
                            for name, ptr in zip(network.inputs, ptrs, strict=True):
                                trt.rt.check_device(ptr, 1, f"calibration input {name}")
                            batches += 1
                        cal.write_calibration_cache(b"calibration-table")
                prof = config.profiles[0].shapes
                cal_prof = getattr(config, "calibration_profile", None)
                trt.builds.append({
                    "inputs": list(network.inputs), "flags": list(config.flags),
                    "tf32": config.tf32,
                    "network_flags": network.flags, "profile": prof, "pool": dict(config.pool),
                    "calibration_batches": batches, "timing_cache": config.cache is not None,
                    "calibration_profile": cal_prof.shapes if cal_prof else None,
                    "input_types": {i.name: i.type.tensor_type.elem_type
                                    for i in network.model.graph.input},
                })
                return json.dumps({
                    "onnx": network.model.SerializeToString().hex(),
                    "profile": {k: [list(s) for s in v] for k, v in prof.items()},
                }).encode()

        class Engine:
            def __init__(self, blob: bytes) -> None:
                d = json.loads(blob)
                self.sess = ort.InferenceSession(bytes.fromhex(d["onnx"]),
                                                 providers=["CPUExecutionProvider"])
                self.profile = d["profile"]
                self.io = {}
                for t in self.sess.get_inputs():
                    self.io[t.name] = (trt.TensorIOMode.INPUT, t)
                for t in self.sess.get_outputs():
                    self.io[t.name] = (trt.TensorIOMode.OUTPUT, t)
                self.names = list(self.io)

            @property
            def num_io_tensors(self) -> int:
                return len(self.names)

            def get_tensor_name(self, i: int) -> str:
                return self.names[i]

            def get_tensor_mode(self, name: str) -> Any:
                return self.io[name][0]

            def get_tensor_dtype(self, name: str) -> Any:
                return trt.DataType[ORT_TYPES[self.io[name][1].type]]

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                mode, t = self.io[name]
                shape = [d if isinstance(d, int) else -1 for d in t.shape]
                if trt.dynamic_sample_dims and mode == trt.TensorIOMode.INPUT:
                    shape = [shape[0]] + [-1] * (len(shape) - 1)
                return tuple(shape)

            def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
                return [tuple(s) for s in self.profile[name]]

            def create_execution_context(self) -> Context:
                return Context(self)

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine, self.shapes, self.addr = engine, {}, {}

            def set_input_shape(self, name: str, shape: tuple) -> bool:
                lo, _, hi = self.engine.profile[name]
                ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))
                self.shapes[name] = tuple(shape)
                return ok

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                if name not in self.engine.io or name in trt.refuse_addresses or not ptr:
                    return False
                self.addr[name] = int(ptr)
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                assert isinstance(stream_handle, int), (
                    f"execute_async_v3 takes an int handle, got {type(stream_handle).__name__}")
                e = self.engine
                missing = [n for n in e.io if n not in self.addr]
                assert not missing, f"execute_async_v3 without addresses for {missing}"
                shapes, addr = dict(self.shapes), dict(self.addr)
                trt.executions.append(stream_handle)

                def run() -> None:
                    feeds = {}
                    for name, (mode, t) in e.io.items():
                        if mode == trt.TensorIOMode.INPUT:
                            dt = np.dtype(NP[ORT_TYPES[t.type]])
                            n = int(np.prod(shapes[name])) * dt.itemsize
                            trt.rt.check_device(addr[name], n, f"input {name}")
                            raw = (ctypes.c_uint8 * n).from_address(addr[name])
                            feeds[name] = np.frombuffer(bytes(raw), dt).reshape(shapes[name])
                    outs = e.sess.run(None, feeds)
                    names = [n for n, (m, _) in e.io.items() if m == trt.TensorIOMode.OUTPUT]
                    for name, arr in zip(names, outs, strict=True):
                        arr = np.ascontiguousarray(arr)
                        trt.rt.check_device(addr[name], arr.nbytes, f"output {name}")
                        ctypes.memmove(addr[name], arr.ctypes.data, arr.nbytes)

                trt.rt.enqueue(stream_handle, run, "execute_async_v3")
                return True

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                if trt.cuda_broken:
                    raise TypeError(NULLPTR)

            def deserialize_cuda_engine(self, blob: bytes) -> Engine | None:
                try:
                    return Engine(blob)
                except (ValueError, KeyError):
                    return None

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        if major < 11:
            class IInt8EntropyCalibrator2:
                def __init__(self) -> None:
                    pass

            self.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2

    def nptype(self, dt: Any) -> type:
        return NP[dt.name]


def install(monkeypatch: pytest.MonkeyPatch, version: str = "10.8.0.43") -> types.SimpleNamespace:
    """Put a fake ``tensorrt`` ``version`` and a fake ``cuda.bindings.runtime`` (real types)
    in ``sys.modules``. Returns ``.trt``, ``.rt`` and ``.use(version)`` (a fresh TensorRT
    fake of another version over the same CUDA fake)."""
    import cuda
    import cuda.bindings

    rt = FakeCudaRuntime()
    monkeypatch.setattr(cuda.bindings, "runtime", rt, raising=False)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    ns = types.SimpleNamespace(rt=rt)

    def use(v: str) -> FakeTRT:
        ns.trt = FakeTRT(v, rt)
        monkeypatch.setitem(sys.modules, "tensorrt", ns.trt)
        return ns.trt

    ns.use = use
    use(version)
    return ns
