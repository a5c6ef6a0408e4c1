"""One ONNX Runtime thread pool for every session of the process (opt-in).

A bundle runs on several sessions (stages, the ``If`` graph, the composed chain). Each
session owning a pool means the pools compete for the same cores: an idle one that spins
steals the running one's core, so by default ours stop spinning at the end of each run and
pay for waking up on the next (``benchmarks/results/latency.md``). With
:func:`share_thread_pool` every session runs on ONNX Runtime's global pool instead: one
pool, spinning like a default session's, whatever path a call takes.

It is a process-wide switch of ONNX Runtime's, so it is opt-in: call it first thing, before
any session is created (ONNX Runtime 1.32 also starts the pool later, older ones may not:
then it raises); afterwards every ``InferenceSession`` of the process must be created with
``use_per_session_threads = False`` (:func:`new_session_options` does that; ONNX Runtime
refuses the others).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from dgconvert.core.errors import BackendOptionError

_lock = threading.Lock()
_shared: int | None = None


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def shared_threads() -> int | None:
    """The shared pool's size, or None when every session has its own pool."""
    return _shared


def share_thread_pool(threads: int | None = None) -> int:
    """Run every ONNX Runtime session of this process on one pool of ``threads`` (default:
    the cores this process may use); returns its size. Call before any session is created;
    calling again with the same size is a no-op."""
    global _shared
    n = threads or default_threads()
    if n < 1:
        raise BackendOptionError(f"threads={threads}; expected a positive thread count")
    with _lock:
        if _shared is not None:
            if n != _shared:
                raise BackendOptionError(
                    f"this process already shares a pool of {_shared} threads; got a request "
                    f"for {n}. ONNX Runtime has one global pool per process: fix: call "
                    "share_thread_pool once, with the size you want")
            return n
        import onnxruntime as ort

        before = _thread_ids()
        ort.set_global_thread_pool_sizes(n, 1)
        _probe_session()
        after = _thread_ids()
        started = None if before is None or after is None else len(after - before)
        if started is not None and started < n - 1:
            raise BackendOptionError(
                f"ONNX Runtime {ort.__version__} started no global pool of {n} threads (the "
                f"process has {started} new threads, not {n - 1}): its environment was "
                "probably made before, by a session with its own pool. Fix: call "
                "dgconvert.runtime.share_thread_pool() first thing, before any ONNX Runtime "
                "session (dgconvert's or your own) is created")
        _shared = n
        return n


def new_session_options() -> Any:
    """``onnxruntime.SessionOptions()``, on the shared pool when there is one."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if _shared is not None:
        so.use_per_session_threads = False
    return so


def probe_model() -> bytes:
    """A serialized one-node (Identity) graph: to see whether a session can be created."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("probe_in", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("probe_out", TensorProto.FLOAT, [1])
    node = helper.make_node("Identity", ["probe_in"], ["probe_out"])
    return helper.make_model(helper.make_graph([node], "probe", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=8).SerializeToString()


def _probe_session() -> None:
    """A session on the global pool: ORT makes its environment (and the pool's workers)
    with the first session at the latest."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.use_per_session_threads = False  # the shared size is not recorded yet
    so.log_severity_level = 3
    ort.InferenceSession(probe_model(), so, providers=["CPUExecutionProvider"])


def _thread_ids() -> set[str] | None:
    """The process's thread ids (new ones are counted, so threads that end meanwhile, as
    in a Ray worker, do not hide the pool's)."""
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return None
