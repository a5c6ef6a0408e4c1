"""The Ray Serve application: every replica runs a :class:`GatedPool` behind the Open
Inference Protocol endpoints (:class:`dgconvert.serve.server.OIPServer`).

One hop per request: Ray Serve's HTTP proxy hands the request to a replica, which parses
it, submits the images to its pool (continuous batching across the replica's concurrent
requests) and answers. ``ray`` is imported only when an application is built.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GatedResult
from dgconvert.serve.common import (
    RayMetrics,
    ServeOptions,
    model_name,
    model_spec,
    replica_cpus,
    require_ray,
    respond,
)
from dgconvert.serve.protocol import ProtocolError
from dgconvert.serve.server import OIPServer


class GatedModel:
    """One replica: a :class:`GatedPool` (``full``: the ungated model, same batching)
    behind the OIP endpoints. Deployed by :func:`build_app`."""

    def __init__(self, bundle: str, options: dict[str, Any]) -> None:
        from dgconvert.runtime import GatedPool

        opts = ServeOptions(**options)
        b = Bundle.load(bundle)
        self.pool = GatedPool(b, max_batch=opts.max_batch, max_delay_ms=opts.max_delay_ms,
                              full=opts.full, max_pending=max(4096, 4 * opts.max_rows),
                              **opts.runner_kwargs())
        spec = model_spec(b)
        self.metrics = RayMetrics(spec.name)
        self.server = OIPServer(spec, self._infer, max_rows=opts.max_rows, full=opts.full,
                                metrics=self.metrics)
        self._seen = 0

    async def _infer(self, images: np.ndarray) -> GatedResult:
        from dgconvert.runtime import PoolFullError

        try:
            fut = self.pool.submit(images, timeout=0)
        except PoolFullError as exc:
            raise ProtocolError(f"server busy: {exc}", status=503) from None
        result = await asyncio.wrap_future(fut)
        sizes, self._seen = self.pool.batch_sizes_since(self._seen)
        self.metrics.batches(sizes)
        return result

    async def __call__(self, request: Any) -> Any:
        return await respond(self.server, request)

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close(cancel=True, timeout=5)


def build_app(bundle: str | Path | Bundle, options: ServeOptions | None = None,
              split_stages: bool = False) -> Any:
    """The Ray Serve application serving ``bundle`` (bound, ready for ``serve.run``).

    ``split_stages``: one deployment per stage sized to its load (``split.py``)."""
    options = options or ServeOptions()
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if split_stages:
        if options.full:
            raise ValueError("--split-stages and --full exclude each other: the full model "
                             "is one graph")
        from dgconvert.serve.split import build_split_app

        return build_split_app(b, options)
    require_ray()
    from ray import serve

    dep = serve.deployment(
        GatedModel, name=f"{model_name(b)}{'-full' if options.full else ''}",
        num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus(options, options.replicas)})
    return dep.bind(str(b.path.resolve()), asdict(options))


def start(bundle: str | Path | Bundle, options: ServeOptions | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, split_stages: bool = False,
          app_name: str = "dgconvert", route_prefix: str = "/") -> str:
    """Start Serve on (local or connected) Ray and deploy the app; returns its URL.

    Connects to a running cluster when ``RAY_ADDRESS`` is set, else starts Ray locally."""
    return start_many([AppSpec(bundle, options, split_stages, app_name, route_prefix)],
                      host=host, port=port)[0]


@dataclass
class AppSpec:
    """One application of :func:`start_many`."""

    bundle: str | Path | Bundle
    options: ServeOptions | None = None
    split_stages: bool = False
    name: str = "dgconvert"
    route_prefix: str = "/"


def start_many(apps: list[AppSpec], *, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """:func:`start` for several applications at once (deployed in parallel, each under
    its own route prefix); their URLs."""
    ray = require_ray()
    from ray import serve

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    # per-request access logs cost the replica and the proxy CPU on every request
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.run_many([serve.RunTarget(build_app(a.bundle, a.options, a.split_stages),
                                    name=a.name, route_prefix=a.route_prefix,
                                    logging_config=quiet) for a in apps])
    return [f"http://{host}:{port}{'' if a.route_prefix == '/' else a.route_prefix}"
            for a in apps]


def run_server(bundle: str | Path | Bundle, options: ServeOptions | None = None, *,
               host: str = "127.0.0.1", port: int = 8000, split_stages: bool = False,
               echo: Any = print) -> None:
    """:func:`start`, print the URL, block until Ctrl-C (or SIGTERM), then shut Serve down
    (and the local Ray, when this call started it)."""
    import signal

    ray = require_ray()
    started_ray = not ray.is_initialized()
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = None
    try:
        url = start(b, options, host=host, port=port, split_stages=split_stages)
        # after ray.init, which installs its own SIGTERM handler
        previous = signal.signal(signal.SIGTERM, stop)
        echo(f"serving model {model_name(b)!r} at {url}/v2/models/{model_name(b)} "
             "(Open Inference Protocol; Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        from ray import serve

        serve.shutdown()
        if started_ray:
            ray.shutdown()
