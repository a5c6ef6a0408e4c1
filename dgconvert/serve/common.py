"""What the Ray Serve deployments share: options, the model's protocol spec, Ray's
metrics, and the starlette request -> :class:`OIPServer` glue. ``ray`` is imported lazily."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dgconvert.core.bundle import Bundle
from dgconvert.core.errors import DGConvertError
from dgconvert.serve.protocol import ModelSpec
from dgconvert.serve.server import OIPServer, Reply, error_reply

LATENCY_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class ServeUnavailableError(DGConvertError, RuntimeError):
    """Ray Serve is not installed (the ``serve`` extra)."""


def require_ray() -> Any:
    """``ray`` with Serve, or a clear error naming the extra to install."""
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ServeUnavailableError(
            f"serving needs Ray Serve, which is not importable ({exc}). Fix: pip install "
            "\"dgconvert[serve]\" (ray[serve] and tritonclient[http])") from exc
    return ray


#: ``ServeOptions.thread_pool`` values (``--thread-pool``)
THREAD_POOLS = ("shared", "per-session")


@dataclass
class ServeOptions:
    """How a bundle is served (every replica gets a copy)."""

    replicas: int = 1
    max_batch: int = 64
    max_delay_ms: float = 2.0
    full: bool = False
    thresholds: list[float] | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads per replica (None: all cores)
    replica_cpus: float | None = None  # Ray CPUs reserved per replica (None: fit the cluster)
    max_rows: int = 1024  # images per request
    max_ongoing_requests: int = 256  # concurrent requests per replica (they batch together)
    max_pending_rows: int | None = None  # rows a replica holds (None: max(4096, 4 x max_rows))
    drain_timeout_s: float = 30.0  # how long a stopping replica finishes its requests
    backend: str = "auto"  # GatedRunner's backend (--split-stages: ONNX Runtime on the CPU)
    runner_options: dict[str, Any] = field(default_factory=dict)
    #: "shared": every ONNX Runtime session of a replica runs on one pool (the replica's
    #: process is ours: docs/serving.md); "per-session": a pool per session
    thread_pool: str = "shared"

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batch < 1 or self.max_delay_ms < 0 or self.max_rows < 1:
            raise ValueError(f"replicas={self.replicas}, max_batch={self.max_batch}, "
                             f"max_delay_ms={self.max_delay_ms}, max_rows={self.max_rows}; "
                             "expected >= 1, >= 1, >= 0, >= 1")
        if self.max_pending_rows is not None and self.max_pending_rows < self.max_rows:
            raise ValueError(f"max_pending_rows={self.max_pending_rows} is below max_rows="
                             f"{self.max_rows}; expected >= max_rows (a full request must fit)")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s}; expected >= 0")
        if self.thread_pool not in THREAD_POOLS:
            raise ValueError(f"thread_pool={self.thread_pool!r}; expected one of "
                             f"{', '.join(THREAD_POOLS)}")

    @property
    def pending_rows(self) -> int:
        """Rows one replica holds before it answers 503."""
        if self.max_pending_rows is not None:
            return self.max_pending_rows
        return max(4096, 4 * self.max_rows)

    def use_thread_pool(self) -> None:
        """In a replica's process, before its first session: share one ONNX Runtime pool
        (of ``threads``, default all cores) when ``thread_pool`` is ``"shared"``."""
        if self.thread_pool == "shared":
            from dgconvert.core.errors import BackendOptionError
            from dgconvert.runtime import share_thread_pool

            try:
                share_thread_pool(self.threads)
            except BackendOptionError as exc:
                raise BackendOptionError(f"{exc}. In dgconvert serve: pass --thread-pool "
                                         "per-session (ServeOptions(thread_pool="
                                         "'per-session'))") from exc

    def runner_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"backend": self.backend, "thresholds": self.thresholds,
                              **self.runner_options}
        if self.threads:
            kw["threads"] = self.threads
        return kw


def model_name(bundle: Bundle) -> str:
    """The served model's name: the bundle folder's name without ``.dg``."""
    name = bundle.path.name
    return name[:-3] if name.endswith(".dg") and len(name) > 3 else name


def model_spec(bundle: Bundle) -> ModelSpec:
    return ModelSpec(model_name(bundle), tuple(int(s) for s in bundle.input_shape),
                     bundle.num_stages)


class RayMetrics:
    """The server's counters in Ray's metrics (exported by Ray's Prometheus exporter)."""

    def __init__(self, model: str) -> None:
        from ray.serve import metrics

        self.tags = {"model": model}
        stage = ("model", "stage")
        self.rows = metrics.Counter("dgconvert_stage_rows", "rows each stage processed",
                                    tag_keys=stage)
        self.exits = metrics.Counter("dgconvert_stage_exits", "samples that exited at each "
                                     "stage", tag_keys=stage)
        self.requests = metrics.Counter("dgconvert_requests", "inference requests answered",
                                        tag_keys=("model",))
        self.errors = metrics.Counter("dgconvert_request_errors", "requests answered with an "
                                      "error", tag_keys=("model", "status"))
        self.queue = metrics.Gauge("dgconvert_queue_rows", "rows in flight in this replica",
                                   tag_keys=("model",))
        self.batch = metrics.Histogram("dgconvert_batch_size", "rows per stage run (batches "
                                       "formed across requests)", BATCH_BOUNDARIES,
                                       tag_keys=("model",))
        self.request_rows = metrics.Histogram("dgconvert_request_rows", "images per request",
                                              BATCH_BOUNDARIES, tag_keys=("model",))
        self.latency = metrics.Histogram("dgconvert_latency_ms", "request latency in the "
                                         "replica (ms)", LATENCY_MS_BOUNDARIES,
                                         tag_keys=("model",))
        self._stage_tags: dict[int, dict[str, str]] = {}

    def request_done(self, rows: int, stage_rows: list[int], exits: list[int],
                     latency_ms: float) -> None:
        self.requests.inc(1, self.tags)
        self.request_rows.observe(rows, self.tags)
        self.latency.observe(latency_ms, self.tags)
        for k, (r, e) in enumerate(zip(stage_rows, exits, strict=True)):
            tags = self._stage_tags.get(k) or self._stage_tags.setdefault(
                k, {**self.tags, "stage": str(k)})
            if r:
                self.rows.inc(r, tags)
            if e:
                self.exits.inc(e, tags)

    def request_failed(self, status: int) -> None:
        self.errors.inc(1, {**self.tags, "status": str(status)})

    def in_flight(self, rows: int) -> None:
        self.queue.set(rows, self.tags)

    def batches(self, sizes: list[int]) -> None:
        for s in sizes:
            self.batch.observe(s, self.tags)


async def read_body(request: Any, limit: int) -> bytes | Reply:
    """The request body, or a 400 reply once it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_big = error_reply(400, f"the request body exceeds {limit} bytes, the most this "
                               "server takes. Fix: split the batch into smaller requests")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_big
        chunks.append(chunk)
    return b"".join(chunks)


def request_path(request: Any) -> str:
    """The path below the application's route prefix."""
    path = request.url.path
    root = request.scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):]
    return path


async def respond(server: OIPServer, request: Any) -> Any:
    """Run one starlette request through ``server``; a starlette response."""
    from starlette.responses import Response

    body = await read_body(request, server.max_body)
    if isinstance(body, Reply):
        server.failures += 1
        reply = body
    else:
        reply = await server.handle(request.method, request_path(request), request.headers,
                                    body)
    return Response(reply.body, status_code=reply.status, headers=reply.headers)


def replica_cpus(options: ServeOptions, replicas: int) -> float:
    """CPUs each replica reserves: ``options.replica_cpus``, else 1 when the cluster has a
    CPU for every replica, else an equal share."""
    if options.replica_cpus is not None:
        return options.replica_cpus
    ray = require_ray()
    cpus = float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    return min(1.0, math.floor(100 * cpus / replicas) / 100) or 0.01
