"""Ray is started once per test session (2 CPUs); one Serve instance on a free port of
127.0.0.1 carries the gated app at ``/`` and the ``--split-stages`` app at ``/split``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from dgconvert.runtime import GatedRunner


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray's Prometheus exporter listens (metrics reported every 0.5 s)."""
    return _free_port()


@pytest.fixture(scope="session")
def ray_local(metrics_port: int) -> Iterator[Any]:
    """A local Ray whose Serve proxy runs the guard (short deadlines for the tests)."""
    from dgconvert.serve.app import init_ray
    from dgconvert.serve.ingress import GuardOptions

    ray = init_ray(GuardOptions(body_timeout_s=4, header_timeout_s=4), num_cpus=2,
                   configure_logging=False, _metrics_export_port=metrics_port,
                   _system_config={"metrics_report_interval_ms": 500})
    yield ray
    ray.shutdown()  # ends Serve's actors with the local cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def case(exported_bundle: Callable[..., Any]) -> dict[str, Any]:
    """The test bundle, thresholds giving a mix of exits at every stage, the runner's
    reference predictions, and the rows too close to a threshold to compare across batch
    compositions (float noise)."""
    b = exported_bundle("resnet").bundle
    pixels = np.random.default_rng(5).integers(0, 256, (96, 1, 28, 28), dtype=np.uint8)
    rec = GatedRunner(b, backend="onnxruntime", compose=False).collect(pixels)
    t = [float(np.quantile(rec.scores[:, k], 0.6)) for k in range(rec.num_gates)]
    ref = GatedRunner(b, backend="onnxruntime", thresholds=t).predict(pixels)
    near = (np.abs(rec.scores - np.asarray(t, np.float32)) < 1e-4).any(axis=1)
    assert len(set(ref.exit_stage.tolist())) == b.num_stages  # every stage has exits
    return {"bundle": b, "pixels": pixels, "t": t, "ref": ref, "near": near,
            "name": b.path.name.removesuffix(".dg")}


@pytest.fixture(scope="session")
def server(ray_local: Any, case: dict[str, Any]) -> str:
    """``host:port`` of Serve with the gated app at / and the split-stages app at /split."""
    from dgconvert.serve import ServeOptions
    from dgconvert.serve.app import AppSpec, start_many

    port = _free_port()
    opts = ServeOptions(max_batch=16, max_delay_ms=2, thresholds=case["t"], threads=1,
                        max_rows=64, replica_cpus=0.1)  # leaves Ray Data a whole CPU
    # the gated app on one shared ONNX Runtime pool per replica (the default), the split
    # app's stage workers with a pool per session
    split = replace(opts, thread_pool="per-session")
    start_many([AppSpec(case["bundle"], opts),
                AppSpec(case["bundle"], split, split_stages=True, name="split",
                        route_prefix="/split")], host="127.0.0.1", port=port)
    return f"127.0.0.1:{port}"
