"""The gated runner on one shared ONNX Runtime pool, in a process of its own, as a bench
system (``gated-shared``).

:func:`dgconvert.runtime.share_thread_pool` is process-wide, and the default session a
benchmark compares with needs a pool of its own, so the shared-pool runner cannot live in
the benchmark's process. It runs in a spawned child that times its own passes (the batches
cross the pipe before the clock starts); the harness takes turns with it like with any
other system.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.bench.systems import System
from dgconvert.core.exits import GatedResult

SHARED_GATED = "gated-shared"
#: backend options that a shared pool decides for itself (the runner refuses them)
POOL_OPTIONS = ("threads", "spinning", "alone_spinning")
#: the longest one request to the child may take (a pass of the largest batches included)
REPLY_TIMEOUT_S = 900.0


def _child(conn: Any, bundle: str, thresholds: list[float], threads: int,
           max_batch: int | None, options: dict[str, Any]) -> None:
    """The child: a shared pool of ``threads``, one runner, then requests until None."""
    try:
        from dgconvert.runtime import GatedRunner, share_thread_pool

        share_thread_pool(threads)
        runner = GatedRunner(bundle, backend="onnxruntime", thresholds=thresholds,
                             max_batch=max_batch, **options)
        conn.send(("ok", runner.backend.describe()))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    clock = time.perf_counter
    while (msg := conn.recv()) is not None:
        what, payload = msg
        try:
            if what == "predict":
                r = runner.predict(payload)
                conn.send(("ok", (r.labels, r.exit_stage, r.scores)))
            else:  # "pass": time the batches, as the harness does in its own process
                runner.reset_stats()
                t0 = clock()
                for xb in payload:
                    runner.predict(xb)
                conn.send(("ok", (clock() - t0, runner.stats)))
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", traceback.format_exc()))


class SharedPoolGated(System):
    """``GatedRunner`` in a child process that called ``share_thread_pool(threads)``."""

    kind, framework = "gated", "onnx"
    spins = True  # the shared pool spins like a default session's

    def __init__(self, bundle: str, thresholds: Sequence[float], threads: int,
                 max_batch: int | None = None, options: dict[str, Any] | None = None,
                 reference: str = "full") -> None:
        self.id, self.reference = SHARED_GATED, reference
        self.thresholds = [float(t) for t in thresholds]
        opts = {k: v for k, v in (options or {}).items() if k not in POOL_OPTIONS}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="dgconvert-bench-shared", daemon=True,
                                 args=(child, bundle, self.thresholds, threads, max_batch, opts))
        self._proc.start()
        child.close()
        self._stats: list[int] = []
        self.describe = self._reply()  # the child's backend, as describe() says it
        self.label = (f"gated, compacted, one shared pool of {threads} threads (own process, "
                      "ours)")

    def _reply(self) -> Any:
        if not self._conn.poll(REPLY_TIMEOUT_S):
            self.close()
            raise BenchError(f"the {SHARED_GATED} process did not answer within "
                             f"{REPLY_TIMEOUT_S:.0f} s. Fix: rerun with --no-shared-pool")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.close()
            raise BenchError(f"the {SHARED_GATED} process ended (exit code "
                             f"{self._proc.exitcode}). Fix: rerun with --no-shared-pool") from None
        if status != "ok":
            self.close()
            raise BenchError(f"the {SHARED_GATED} process failed:\n{value}Fix: rerun with "
                             "--no-shared-pool")
        return value

    def predict(self, images: np.ndarray) -> GatedResult:
        self._conn.send(("predict", images))
        return GatedResult(*self._reply())

    def timed_pass(self, batches: Sequence[np.ndarray]) -> float:
        """Seconds the child took for ``batches`` (timed there; transfer not included)."""
        self._conn.send(("pass", list(batches)))
        seconds, self._stats = self._reply()
        return float(seconds)

    def reset_rows(self) -> None:
        self._stats = []

    def rows_per_stage(self, n: int, num_stages: int) -> list[int]:
        return list(self._stats)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        if not self._conn.closed:
            self._conn.close()
