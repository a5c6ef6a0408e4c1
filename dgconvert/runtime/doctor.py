"""``dgconvert doctor``: what this machine offers each backend, and what is missing.

Reports versions (Python, numpy, onnxruntime and its execution providers, onnx, TensorRT,
cuda-python, ModelOpt), the CUDA driver/runtime (via cuda-python, else ``nvidia-smi``), the
GPUs, and per backend whether it is usable, with the install command for what is missing.
With a bundle it also says which engines are built and what ``backend="auto"`` would pick.
Problems it flags (:func:`version_problems`): a driver older than the CUDA runtime of
cuda-python, TensorRT or onnxruntime-gpu; onnxruntime and onnxruntime-gpu installed side by
side; and a CUDA provider that onnxruntime lists but cannot load (checked with a one-node
session, the only session doctor creates; no GPU memory is allocated otherwise).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgconvert.runtime.select import Probe, pick_backend, probe
from dgconvert.runtime.tensorrt_backend import MIN_DRIVER

INSTALL = {
    "tensorrt": "pip install tensorrt cuda-python",
    "cuda-python": "pip install cuda-python",
    "onnxruntime-gpu": "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu<1.27' "
                       "(CUDA 12 driver) or 'onnxruntime-gpu>=1.27' (CUDA 13, driver >= 580)",
    "onnxruntime": "pip install onnxruntime",
    "onnx": "pip install onnx",
    "modelopt": "pip install 'nvidia-modelopt[onnx]'",
}
log = logging.getLogger(__name__)
CUDA_EP = "CUDAExecutionProvider"


@dataclass
class BackendStatus:
    """One backend: usable or not, what is missing, how to install it."""

    name: str
    available: bool
    detail: str
    missing: list[str] = field(default_factory=list)
    install: str | None = None


@dataclass
class Report:
    """Everything ``dgconvert doctor`` prints."""

    versions: dict[str, str | None]
    cuda: dict[str, str]
    gpus: list[Any]
    providers: list[str]
    backends: list[BackendStatus]
    bundle: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


def _version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module is None:
        return None
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ImportError:  # a dotted name whose parent package is missing
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception:
        return "installed (fails to import)"


def collect(bundle_path: str | Path | None = None, probe_result: Probe | None = None) -> Report:
    """Probe the machine (and optionally a bundle) into a :class:`Report`."""
    from dgconvert.core.version import __version__
    from dgconvert.runtime import cuda

    p = probe_result if probe_result is not None else probe()
    versions = {
        "dgconvert": __version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu", "onnxruntime"),
        "onnx": _version("onnx", "onnx"),
        "tensorrt": p.trt_version,
        "cuda-python": _version("cuda-python") or _version("cuda-bindings", "cuda.bindings"),
        "modelopt": _version("nvidia-modelopt"),
    }
    cuda_info: dict[str, str] = {}
    if p.cuda_python or p.cuda_installed:  # the versions answer even when the driver is too old
        try:
            cuda_info.update(cuda.versions())
        except Exception as exc:  # a machine without driver: say so, do not fail
            cuda_info["error"] = str(exc)
    if p.notes.get("cuda") and p.cuda_installed:
        cuda_info["error"] = p.notes["cuda"]
    smi_gpus, smi_driver = ([], None) if p.cuda_python and p.gpus else cuda.nvidia_smi()
    if smi_driver:
        cuda_info["nvidia-smi driver"] = smi_driver
    dists = {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu")}
    problems = version_problems(cuda_info, versions, dists)
    cuda_ep_error = None
    if CUDA_EP in p.ort_providers:
        from dgconvert.runtime.onnxruntime_gpu import provider_loads

        cuda_ep_error = provider_loads(CUDA_EP)
        if cuda_ep_error:
            problems.append(f"{CUDA_EP} is listed by onnxruntime but does not load: "
                            f"{cuda_ep_error}")
    report = Report(versions, cuda_info, list(p.gpus or smi_gpus), list(p.ort_providers),
                    backend_status(p, versions, cuda_ep_error), problems=problems)
    if bundle_path is not None:
        report.bundle = bundle_status(bundle_path, p)
    return report


def _major_minor(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?", text or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def version_problems(cuda_info: dict[str, str], versions: dict[str, str | None],
                     dists: dict[str, str | None]) -> list[str]:
    """What cannot work together here: the driver's CUDA version (``cuda_info["driver"]``)
    against the CUDA runtime of cuda-python, TensorRT and onnxruntime-gpu, and onnxruntime
    installed beside onnxruntime-gpu. Pure: tested on any machine."""
    problems = []
    ort_cpu, ort_gpu = dists.get("onnxruntime"), dists.get("onnxruntime-gpu")
    if ort_cpu and ort_gpu:
        problems.append(
            f"onnxruntime {ort_cpu} and onnxruntime-gpu {ort_gpu} are both installed: they share "
            "one `onnxruntime` folder and the CUDA provider can disappear (onnxruntime issue "
            "#26996). Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then reinstall "
            "onnxruntime-gpu alone (docs/gpu.md, 'Install')."
        )
    driver = _major_minor(cuda_info.get("driver"))
    if driver is None:
        return problems
    shown = f"{driver[0]}.{driver[1]}"
    runtime = _major_minor(cuda_info.get("runtime"))
    needs: list[tuple[str, tuple[int, int]]] = []
    if runtime is not None:
        needs.append((f"cuda-python {versions.get('cuda-python') or ''} (CUDA runtime "
                      f"{runtime[0]}.{runtime[1]})", runtime))
    if versions.get("tensorrt"):
        from dgconvert.runtime.tensorrt_backend import trt_cuda_major

        cm = trt_cuda_major(str(versions["tensorrt"]))
        needs.append((f"TensorRT {versions['tensorrt']} (built for CUDA {cm})", (cm, 0)))
    ortg = _major_minor(ort_gpu)
    if ortg is not None:
        cuda_major = 13 if ortg >= (1, 27) else 12
        needs.append((f"onnxruntime-gpu {ort_gpu} (built for CUDA {cuda_major})", (cuda_major, 0)))
    for what, need in needs:
        if driver < need:
            log.info("doctor: driver CUDA %s < %s for %s", shown, need, what)
            problems.append(
                f"the NVIDIA driver supports CUDA {shown}, older than {what}: its CUDA calls "
                f"fail (cudaErrorInsufficientDriver). Fix: update the driver (CUDA {need[0]} "
                f"needs >= {MIN_DRIVER.get(need[0], '?')}), or install the stack for CUDA "
                f"{driver[0]}: pip install 'dgconvert[gpu-cu{driver[0]}]' (docs/gpu.md)."
            )
    return problems


def backend_status(p: Probe, versions: dict[str, str | None],
                   cuda_ep_error: str | None = None) -> list[BackendStatus]:
    """Usable or not, and what is missing, for tensorrt, onnxruntime-gpu and onnxruntime.

    ``cuda_ep_error``: why a listed CUDA provider did not load (``provider_loads``)."""
    gpu = bool(p.gpus)
    cuda_ok = ("cuda-python", p.cuda_python)
    if p.cuda_installed and not p.cuda_python:
        cuda_ok = ("a CUDA driver that cuda-python can use (see CUDA above)", False)
    trt_missing = [m for m, ok in (("tensorrt", p.trt_version is not None),
                                   cuda_ok, ("an NVIDIA GPU", gpu)) if not ok]
    trt_install = None
    if "tensorrt" in trt_missing:
        trt_install = INSTALL["tensorrt"]
    elif "cuda-python" in trt_missing:
        trt_install = INSTALL["cuda-python"]
    trt = BackendStatus(
        "tensorrt", not trt_missing,
        f"TensorRT {p.trt_version}" if not trt_missing else "needs " + ", ".join(trt_missing),
        trt_missing, trt_install,
    )
    cuda_ep = "CUDAExecutionProvider" in p.ort_providers
    ort_gpu_missing = [m for m, ok in (("CUDAExecutionProvider (onnxruntime-gpu)", cuda_ep),
                                       ("an NVIDIA GPU", gpu)) if not ok]
    if cuda_ep and cuda_ep_error:
        ort_gpu_missing.insert(0, "a CUDAExecutionProvider that loads (it is listed but does not)")
    ort_gpu = BackendStatus(
        "onnxruntime-gpu", not ort_gpu_missing,
        "providers " + ", ".join(x for x in p.ort_providers if x != "CPUExecutionProvider")
        if not ort_gpu_missing else "needs " + ", ".join(ort_gpu_missing),
        ort_gpu_missing, INSTALL["onnxruntime-gpu"] if not cuda_ep else None,
    )
    has_ort = versions.get("onnxruntime") is not None
    ort = BackendStatus(
        "onnxruntime", has_ort,
        f"ONNX Runtime {versions.get('onnxruntime')} on the CPU" if has_ort else "needs onnxruntime",
        [] if has_ort else ["onnxruntime"], None if has_ort else INSTALL["onnxruntime"],
    )
    return [trt, ort_gpu, ort]


def bundle_status(path: str | Path, p: Probe) -> dict[str, Any]:
    """Engines built in the bundle and what ``backend="auto"`` would choose here."""
    from dgconvert.core.bundle import Bundle

    b = Bundle.load(path)
    name, _, reason = pick_backend(b, p)
    engines = {k: {"precision": v.get("precision"), "tensorrt": v.get("tensorrt"),
                   "max_batch": v.get("max_batch")} for k, v in b.manifest.engines.items()}
    return {"path": str(b.path), "engines": engines, "auto": name, "reason": reason}


def format_report(r: Report) -> str:
    """Human-readable text of a :class:`Report`."""
    v = r.versions
    lines = ["dgconvert doctor", ""]
    lines += [f"  {k:<12} {val if val is not None else 'not installed'}" for k, val in v.items()]
    lines += ["", "CUDA"]
    if r.cuda:
        lines += [f"  {k:<12} {val}" for k, val in r.cuda.items()]
    else:
        lines.append("  no CUDA driver information (no cuda-python, no nvidia-smi)")
    lines.append(f"  GPUs         {len(r.gpus)}")
    for g in r.gpus:
        mem = f", {g.memory_bytes / 2**30:.0f} GiB" if g.memory_bytes else ""
        lines.append(f"    [{g.index}] {g.name} (compute {g.compute_capability}{mem})")
    lines += ["", f"ONNX Runtime providers: {', '.join(r.providers) or 'none'}", "", "Backends"]
    for s in r.backends:
        mark = "ok " if s.available else "-- "
        lines.append(f"  {mark}{s.name:<16} {s.detail}")
        if s.install:
            lines.append(f"       install: {s.install}")
    if v.get("onnx") is None:
        lines.append(f"  note: `dgconvert build --precision fp16` on TensorRT 11 needs onnx ({INSTALL['onnx']})")
    if v.get("tensorrt") and v.get("modelopt") is None:
        lines.append(f"  note: --precision int8 on TensorRT 11 needs ModelOpt ({INSTALL['modelopt']})")
    if r.problems:
        lines += ["", "Problems"]
        lines += [f"  !! {msg}" for msg in r.problems]
    if r.bundle:
        lines += ["", f"Bundle {r.bundle['path']}"]
        eng = r.bundle["engines"]
        lines.append("  engines: " + (", ".join(f"{k} ({e['precision']}, TensorRT {e['tensorrt']})"
                                               for k, e in eng.items()) or "none"))
        lines.append(f"  auto backend: {r.bundle['auto']} ({r.bundle['reason']})")
    return "\n".join(lines)
