"""``make gpu-check``: one script for a GPU machine, using only what is installed there.

Runs with plain ``python3`` and ``PYTHONPATH=.`` (no venv, no network, no dgconvert install):
every import is lazy and each missing piece turns into a reported skip. Checks, each timed
and reported ``ok`` / ``FAIL`` / ``skip``:

1. the CUDA layer (``dgconvert.runtime.cuda`` over the real ``cuda-bindings``) against numpy:
   devices and driver/runtime versions, device buffers (``cudaMalloc``/``cudaMemcpy``), pinned
   memory with asynchronous copies on a stream, two streams with distinct handles, ping-pong
   buffers, error tuples (an impossible ``cudaMalloc``), and the stream handle: ``int(stream)``
   handed to another library (CuPy or PyTorch ``ExternalStream``), which enqueues a kernel
   between our copies on the same stream, as TensorRT's ``execute_async_v3`` would;
2. TensorRT: ``pytest -m gpu`` over tests/runtime/test_gpu*.py when ``tensorrt`` and pytest import;
3. onnxruntime-gpu: whether a listed ``CUDAExecutionProvider`` really loads.

Without a GPU (or without numpy / cuda-bindings) it says so and exits 0. It stops starting
checks after ``--budget`` seconds (default 420: done within 8 minutes). The report goes to
stdout and to ``--out`` (default ``out/gpu_check.md``).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """A check that cannot run here (what is missing)."""


class Report:
    """Check results in order, each ``(status, name, detail, seconds)``."""

    def __init__(self, budget: float) -> None:
        self.rows: list[tuple[str, str, str, float]] = []
        self.deadline = time.monotonic() + budget

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        if time.monotonic() > self.deadline:
            self.rows.append(("skip", name, "time budget spent", 0.0))
            return False
        t0 = time.monotonic()
        try:
            detail, status = fn(), "ok"
        except Skip as exc:
            detail, status = str(exc), "skip"
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the rest
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
        self.rows.append((status, name, detail, time.monotonic() - t0))
        print(f"[{status:>4}] {name}: {detail}", flush=True)
        return status == "ok"

    def text(self, env: dict[str, str]) -> str:
        lines = ["# dgconvert gpu-check", ""]
        lines += [f"- {k}: {v}" for k, v in env.items()]
        lines += ["", "| status | check | detail | s |", "| --- | --- | --- | --- |"]
        lines += [f"| {s} | {n} | {d.replace('|', '/')} | {t:.2f} |" for s, n, d, t in self.rows]
        failed = [n for s, n, _, _ in self.rows if s == "FAIL"]
        skipped = [n for s, n, _, _ in self.rows if s == "skip"]
        lines += ["", f"**{len(self.rows) - len(failed) - len(skipped)} ok, {len(failed)} failed, "
                  f"{len(skipped)} skipped**" + (f" (failed: {', '.join(failed)})" if failed else "")]
        return "\n".join(lines) + "\n"


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - missing or broken: both are "not usable"
        return f"not usable ({type(exc).__name__}: {str(exc)[:80]})"
    return str(getattr(mod, "__version__", "installed"))


def environment() -> dict[str, str]:
    env = {"python": f"{platform.python_version()} ({sys.executable})",
           "machine": f"{platform.node()} {platform.machine()}"}
    for label, mod in (("numpy", "numpy"), ("cuda-bindings", "cuda.bindings"),
                       ("tensorrt", "tensorrt"), ("onnxruntime", "onnxruntime"),
                       ("cupy", "cupy"), ("torch", "torch"), ("pytest", "pytest")):
        env[label] = _version(mod)
    return env


# -- the CUDA layer -------------------------------------------------------------------------
def cuda_checks(rep: Report) -> None:
    try:
        import numpy as np
    except ImportError:
        rep.run("CUDA layer", _skip("numpy is not installed"))
        return
    try:
        from dgconvert.runtime import cuda

        rt = cuda.load_runtime()
    except Exception as exc:  # noqa: BLE001
        rep.run("CUDA layer", _skip(f"cuda-bindings is not usable: {exc}"))
        return
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or not count:
        why = getattr(err, "name", str(err)) if err != rt.cudaError_t.cudaSuccess else "0 devices"
        rep.run("CUDA layer", _skip(f"no usable GPU here (cudaGetDeviceCount: {why})"))
        return
    rng = np.random.default_rng(0)

    def devices() -> str:
        gpus, v = cuda.list_gpus(), cuda.versions()
        drv, run = (tuple(int(x) for x in v[k].split(".")) for k in ("driver", "runtime"))
        assert drv >= run, f"driver CUDA {v['driver']} is older than the runtime {v['runtime']}"
        return f"{len(gpus)} GPU(s): {', '.join(f'{g.name} ({g.sm})' for g in gpus)}; " \
               f"driver CUDA {v['driver']}, runtime {v['runtime']}"

    def handles() -> str:
        s1, s2 = cuda.Stream(), cuda.Stream()
        try:
            assert isinstance(s1.ptr, int) and s1.ptr == int(s1.handle) != 0
            assert s1.ptr != s2.ptr, "two streams share a handle"
            ptr = getattr(s1.handle, "getPtr", lambda: None)()
            assert ptr != s1.ptr, "getPtr() equals the handle (unexpected for cuda-bindings)"
            return f"int(cudaStream_t) = {s1.ptr:#x}, {s2.ptr:#x}; getPtr() = {ptr:#x} (not used)"
        finally:
            s1.destroy()
            s2.destroy()

    def device_roundtrip() -> str:
        x = rng.standard_normal(4 << 20).astype(np.float32)  # 16 MiB
        buf = cuda.DeviceBuffer(x.nbytes)
        try:
            cuda.memcpy_htod(buf.ptr, x)
            y = cuda.memcpy_dtoh(np.empty_like(x), buf.ptr)
            assert np.array_equal(x, y), "device round trip changed the data"
        finally:
            buf.free()
        return f"{x.nbytes >> 20} MiB host -> device -> host equal (cudaMalloc, cudaMemcpy, cudaFree)"

    def pinned_async() -> str:
        n = 1 << 20
        x = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
        dev, pin, s = cuda.DeviceBuffer(x.nbytes), cuda.PinnedBuffer(x.nbytes), cuda.Stream()
        try:
            host = pin.view(np.int64, n)
            host[:] = x
            s.htod(dev.ptr, pin.ptr, x.nbytes)
            s.synchronize()
            host[:] = 0
            s.dtoh(pin.ptr, dev.ptr, x.nbytes)
            s.synchronize()
            assert np.array_equal(host, x), "async copy through pinned memory changed the data"
        finally:
            s.synchronize()
            dev.free()
            pin.free()
            s.destroy()
        return f"{x.nbytes >> 20} MiB through pinned memory on a stream (cudaMallocHost, " \
               "cudaMemcpyAsync, cudaStreamSynchronize, cudaFreeHost)"

    def ping_pong() -> str:
        rows, width, rounds = 256, 4096, 8
        nbytes = rows * width * 4
        bufs = [cuda.DeviceBuffer(nbytes), cuda.DeviceBuffer(nbytes)]
        pin, s = cuda.PinnedBuffer(nbytes), cuda.Stream()
        try:
            data = [rng.standard_normal((rows, width)).astype(np.float32) for _ in range(rounds)]
            for k, x in enumerate(data):
                pin.view(np.float32, x.size)[:] = x.reshape(-1)
                s.htod(bufs[k % 2].ptr, pin.ptr, nbytes)
                s.synchronize()
                if k:  # the other buffer still holds the previous round
                    prev = cuda.memcpy_dtoh(np.empty_like(x), bufs[(k - 1) % 2].ptr)
                    assert np.array_equal(prev, data[k - 1]), f"round {k} clobbered the other buffer"
                s.dtoh(pin.ptr, bufs[k % 2].ptr, nbytes)
                s.synchronize()
                assert np.array_equal(pin.view(np.float32, x.size).reshape(x.shape), x)
        finally:
            s.synchronize()
            for b in (*bufs, pin):
                b.free()
            s.destroy()
        return f"{rounds} rounds over two {nbytes >> 20} MiB device buffers"

    def errors() -> str:
        try:
            cuda.DeviceBuffer(1 << 60)
        except cuda.CudaError as exc:
            assert "cudaErrorMemoryAllocation" in str(exc), str(exc)
            return f"cudaMalloc(2**60) -> CudaError: {str(exc)[:90]}"
        raise AssertionError("cudaMalloc(2**60) succeeded")

    def external_stream() -> str:
        x = rng.standard_normal(1 << 20).astype(np.float32)
        dev, pin, s = cuda.DeviceBuffer(x.nbytes), cuda.PinnedBuffer(x.nbytes), cuda.Stream()
        try:
            pin.view(np.float32, x.size)[:] = x
            s.htod(dev.ptr, pin.ptr, x.nbytes)  # enqueued, not waited for
            who = _scale_on_stream(dev.ptr, x.size, s.ptr)  # a kernel on the same handle
            s.dtoh(pin.ptr, dev.ptr, x.nbytes)
            s.synchronize()
            got = pin.view(np.float32, x.size)
            assert np.array_equal(got, 2 * x), "the kernel did not run between our copies"
        finally:
            s.synchronize()  # queued work must finish before its buffers go
            dev.free()
            pin.free()
            s.destroy()
        return f"{who} ran x*2 on ExternalStream(int(stream)) between our async copies: in order"

    for name, fn in (("devices and versions", devices), ("stream handles", handles),
                     ("device buffers", device_roundtrip), ("pinned memory, async copies", pinned_async),
                     ("ping-pong buffers", ping_pong), ("error tuples", errors),
                     ("stream handle in another library", external_stream)):
        rep.run(name, fn)


def _scale_on_stream(ptr: int, count: int, handle: int) -> str:
    """Multiply ``count`` float32 at device ``ptr`` by 2 on the stream ``handle`` (CuPy, else
    PyTorch); returns which library did."""
    try:
        import cupy

        mem = cupy.cuda.UnownedMemory(ptr, count * 4, owner=None)
        arr = cupy.ndarray((count,), cupy.float32, cupy.cuda.MemoryPointer(mem, 0))
        with cupy.cuda.ExternalStream(handle):
            arr *= 2
        return f"CuPy {cupy.__version__}"
    except ImportError:
        pass
    try:
        import torch
    except ImportError as exc:
        raise Skip("neither CuPy nor PyTorch is installed to run a kernel on our stream") from exc
    if not torch.cuda.is_available():
        raise Skip(f"no CuPy, and PyTorch {torch.__version__} has no CUDA: no kernel to run "
                   "on our stream")
    stream = torch.cuda.ExternalStream(handle)
    with torch.cuda.stream(stream):
        t = torch.empty(count, dtype=torch.float32, device="cuda")
        # copy our buffer in, scale, copy back: all on our stream, ordered with our copies
        from dgconvert.runtime import cuda

        rt = cuda.load_runtime()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        ours = rt.cudaStream_t(handle)
        cuda.check(rt.cudaMemcpyAsync(t.data_ptr(), ptr, count * 4, kind, ours), "D2D")
        t.mul_(2)
        cuda.check(rt.cudaMemcpyAsync(ptr, t.data_ptr(), count * 4, kind, ours), "D2D")
    return f"PyTorch {torch.__version__}"


# -- TensorRT and onnxruntime-gpu -----------------------------------------------------------
def _skip(why: str) -> Callable[[], str]:
    def fn() -> str:
        raise Skip(why)

    return fn


def tensorrt_checks(rep: Report) -> None:
    def run() -> str:
        try:
            import tensorrt
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"TensorRT is not installed ({type(exc).__name__}): engine build/run "
                       "parity (tests/runtime/test_gpu.py) not checked") from exc
        try:
            import pytest  # noqa: F401
        except ImportError as exc:
            raise Skip("pytest is not installed: tests/runtime/test_gpu.py not run") from exc
        left = max(30, int(rep.deadline - time.monotonic()))
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "tests/runtime/test_gpu.py", "tests/runtime/test_gpu_cuda_bindings.py"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        tail = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        assert res.returncode == 0, f"pytest -m gpu failed: {tail}\n{res.stdout[-2000:]}"
        return f"TensorRT {tensorrt.__version__}: pytest -m gpu: {tail}"

    rep.run("TensorRT engines (pytest -m gpu)", run)


def onnxruntime_gpu_checks(rep: Report) -> None:
    def run() -> str:
        try:
            import onnxruntime as ort
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"onnxruntime is not installed ({type(exc).__name__})") from exc
        listed = ort.get_available_providers()
        if "CUDAExecutionProvider" not in listed:
            raise Skip(f"onnxruntime {ort.__version__} lists no CUDAExecutionProvider "
                       f"({', '.join(listed)}): onnxruntime-gpu is not installed")
        from dgconvert.runtime.onnxruntime_gpu import provider_loads

        why = provider_loads("CUDAExecutionProvider")
        assert why is None, why
        return f"onnxruntime {ort.__version__}: CUDAExecutionProvider loads"

    rep.run("onnxruntime-gpu provider", run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/gpu_check.md"), help="report file")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds after which no further check starts (default 420)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    env = environment()
    print("dgconvert gpu-check: " + "; ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rep = Report(args.budget)
    cuda_checks(rep)
    tensorrt_checks(rep)
    onnxruntime_gpu_checks(rep)
    text = rep.text(env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text.splitlines()[-1])
    print(f"report: {args.out}")
    if all(s == "skip" for s, *_ in rep.rows):
        print("gpu-check: nothing to check on this machine (no GPU or no CUDA bindings): "
              "every check skipped, see the reasons above.")
    return 1 if any(s == "FAIL" for s, *_ in rep.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
