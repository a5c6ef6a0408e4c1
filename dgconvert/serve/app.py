"""The Ray Serve application: every replica runs a :class:`GatedPool` behind the Open
Inference Protocol endpoints (:class:`dgconvert.serve.server.OIPServer`).

One hop per request: Ray Serve's HTTP proxy hands the request to a replica, which parses
it, submits the images to its pool (continuous batching across the replica's concurrent
requests) and answers. ``ray`` is imported only when an application is built.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
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
from dgconvert.serve.ingress import (
    CALLBACK,
    CALLBACK_VAR,
    GuardOptions,
    guard_installed,
    proxy_environment,
)
from dgconvert.serve.lifecycle import (
    StopSignals,
    ray_init_keeping_signals,
    raylets,
    reap_process_group,
    run_bounded,
)
from dgconvert.serve.protocol import RETRY_AFTER_S, unavailable
from dgconvert.serve.server import OIPServer, body_limit


class GatedModel:
    """One replica: a :class:`GatedPool` (``full``: the ungated model, same batching)
    behind the OIP endpoints. Deployed by :func:`build_app`."""

    def __init__(self, bundle: str, options: dict[str, Any]) -> None:
        from dgconvert.runtime import GatedPool

        opts = ServeOptions(**options)
        opts.use_thread_pool()
        b = Bundle.load(bundle)
        self.pool = GatedPool(b, max_batch=opts.max_batch, max_delay_ms=opts.max_delay_ms,
                              full=opts.full, max_pending=opts.pending_rows,
                              **opts.runner_kwargs())
        spec = model_spec(b)
        self.metrics = RayMetrics(spec.name)
        self.server = OIPServer(spec, self._infer, max_rows=opts.max_rows, full=opts.full,
                                metrics=self.metrics,
                                runtime=self.pool.runner.backend.describe())
        self._seen = 0

    async def _infer(self, images: np.ndarray) -> GatedResult:
        from dgconvert.runtime import PoolFullError

        try:
            fut = self.pool.submit(images, timeout=0)
        except PoolFullError:
            raise unavailable(f"server busy: this replica holds {self.pool.max_pending} rows "
                              f"in flight, its most (--max-pending-rows), and cannot take "
                              f"{len(images)} more. Fix: retry after {RETRY_AFTER_S} s, serve "
                              "more --replicas, or raise --max-pending-rows") from None
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
        graceful_shutdown_timeout_s=options.drain_timeout_s,
        ray_actor_options={"num_cpus": replica_cpus(options, options.replicas)})
    return dep.bind(str(b.path.resolve()), asdict(options))


def start(bundle: str | Path | Bundle, options: ServeOptions | None = None, *,
          host: str = "127.0.0.1", port: int = 8000, split_stages: bool = False,
          app_name: str = "dgconvert", route_prefix: str = "/",
          guard: GuardOptions | None = None) -> str:
    """Start Serve on (local or connected) Ray and deploy the app; returns its URL.

    Connects to a running cluster when ``RAY_ADDRESS`` is set, else starts Ray locally
    with the proxy guard (``ingress.py``: body and header deadlines, retry on replica
    loss) configured by ``guard``."""
    return start_many([AppSpec(bundle, options, split_stages, app_name, route_prefix)],
                      host=host, port=port, guard=guard)[0]


@dataclass
class AppSpec:
    """One application of :func:`start_many`."""

    bundle: str | Path | Bundle
    options: ServeOptions | None = None
    split_stages: bool = False
    name: str = "dgconvert"
    route_prefix: str = "/"


def init_ray(guard: GuardOptions | None = None, stop: StopSignals | None = None,
             **kwargs: Any) -> Any:
    """``ray.init`` (local unless ``RAY_ADDRESS``) with the proxy guard in the
    environment Ray's processes inherit; with ``stop``, signals during start-up reach it
    instead of Ray's handlers. Warns when the guard cannot reach the proxies (a cluster
    started elsewhere, or Ray already running without it)."""
    ray = require_ray()
    if not ray.is_initialized():
        os.environ.update(proxy_environment(guard or GuardOptions()))
        if os.environ.get("RAY_ADDRESS"):
            warnings.warn("RAY_ADDRESS is set: the cluster's Serve proxies run the body/header "
                          "deadlines and the retry on replica loss only if the cluster was "
                          f"started with {CALLBACK_VAR}={CALLBACK} in its environment",
                          stacklevel=2)
        opts = {"ignore_reinit_error": True, "include_dashboard": False,
                "log_to_driver": False, **kwargs}
        if stop is None:
            ray.init(**opts)
        else:
            with ray_init_keeping_signals(stop):
                ray.init(**opts)
    elif not guard_installed():
        warnings.warn("Ray was started without the dgconvert proxy guard: no body/header "
                      "deadlines and no retry on replica loss. Fix: call "
                      "dgconvert.serve.app.init_ray before anything starts Ray", stacklevel=2)
    return ray


def resolve_guard(guard: GuardOptions | None, apps: list[AppSpec]) -> GuardOptions:
    """``guard`` with ``max_body`` filled in: the largest request body ``apps`` take."""
    guard = guard or GuardOptions()
    if guard.max_body is not None:
        return guard
    limit = 0
    for a in apps:
        b = a.bundle if isinstance(a.bundle, Bundle) else Bundle.load(a.bundle)
        limit = max(limit, body_limit(model_spec(b).input_shape,
                                      (a.options or ServeOptions()).max_rows))
    return replace(guard, max_body=limit)


def start_many(apps: list[AppSpec], *, host: str = "127.0.0.1", port: int = 8000,
               guard: GuardOptions | None = None) -> list[str]:
    """:func:`start` for several applications at once (deployed in parallel, each under
    its own route prefix); their URLs."""
    init_ray(resolve_guard(guard, apps))
    from ray import serve

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
               guard: GuardOptions | None = None, echo: Any = print,
               ignore_signals_after: bool = False) -> None:
    """:func:`start`, print the URL, serve until SIGTERM or SIGINT, then drain: requests
    in flight are answered (within ``options.drain_timeout_s``), new ones refused, Serve
    and the local Ray shut down and any process of Ray's left in this process's group
    killed. A signal at any moment — while Ray starts, while the app deploys, while
    serving, again while stopping — ends the same way; the handlers are installed before
    Ray starts. After the stop the previous handlers come back, or with
    ``ignore_signals_after`` both signals are ignored: for a process that exits next,
    whose teardown (Python resets its handlers to the default there) a late signal
    would otherwise turn from exit 0 into death by that signal."""
    options = options or ServeOptions()
    stop = StopSignals(echo).install()
    ray = require_ray()
    started_ray = not ray.is_initialized()
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    name = model_name(b)
    app = AppSpec(b, options, split_stages)
    guard = resolve_guard(guard, [app])
    drain = Path(tempfile.gettempdir()) / f"dgconvert-serve-{os.getpid()}-{port}.draining"
    drain.unlink(missing_ok=True)
    if guard.drain_file is None:
        guard = replace(guard, drain_file=str(drain))
    try:
        init_ray(guard, stop)
        if not stop.requested.is_set():
            url = start_many([app], host=host, port=port)[0]
            stop.reinstall()  # in case anything during deployment replaced them
            echo(f"serving model {name!r} at {url}/v2/models/{name} (Open Inference "
                 "Protocol; Ctrl-C or SIGTERM stops)")
        while not stop.wait(0.5):
            pass
    finally:
        stop.stopping = True
        echo(f"stopping: draining requests in flight (at most {options.drain_timeout_s:g} s, "
             "--drain-timeout); new requests get 503")
        if guard.drain_file:
            Path(guard.drain_file).touch()
        try:
            shutdown(started_ray, options.drain_timeout_s, echo)
        finally:
            if guard.drain_file:
                Path(guard.drain_file).unlink(missing_ok=True)
            stop.restore(ignore=ignore_signals_after)


def shutdown(started_ray: bool, drain_timeout_s: float, echo: Any = print) -> None:
    """Stop Serve (its replicas finish their requests within ``drain_timeout_s``), then
    the local Ray and what is left of its processes."""
    ray = require_ray()
    raylet_pids = raylets(os.getpgrp()) if started_ray else set()
    if ray.is_initialized():
        from ray import serve

        if not run_bounded(serve.shutdown, drain_timeout_s + 15):
            echo("Serve did not stop within the drain timeout; stopping Ray")
    if started_ray:
        if ray.is_initialized():
            ray.shutdown()
        killed = reap_process_group(raylet_pids)
        if killed:
            echo(f"killed {len(killed)} Ray process(es) still running after shutdown: "
                 + ", ".join(cmd.split()[0] for _, cmd in killed[:5]))
