"""``dgconvert serve``: a bundle behind the Open Inference Protocol (Ray Serve)."""

from __future__ import annotations

from pathlib import Path

import click

from dgconvert.cli.common import backend_option, friendly_errors, parse_floats, threads_option
from dgconvert.serve.common import THREAD_POOLS


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--replicas", type=int, default=1, show_default=True,
              help="Replicas (each runs a GatedPool); with --split-stages: stage replicas in all.")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Rows per stage run, batched across concurrent requests.")
@click.option("--max-delay-ms", type=float, default=2.0, show_default=True,
              help="Longest a row waits for a batch to fill while the replica is busy (an "
              "idle replica runs what it holds at once).")
@click.option("--full", is_flag=True, help="Serve the ungated model (full.onnx), same batching: "
              "the baseline.")
@click.option("--split-stages", is_flag=True, help="One deployment per stage, replicas sized "
              "to each stage's load from the calibrated exit fractions.")
@click.option("--thresholds", default=None, help="Comma-separated per-gate thresholds "
              "(default: the bundle's).")
@backend_option
@threads_option
@click.option("--thread-pool", type=click.Choice(THREAD_POOLS), default="shared",
              show_default=True, help="shared: all ONNX Runtime sessions of a replica run on "
              "one pool of --threads (faster, docs/serving.md); per-session: a pool each.")
@click.option("--replica-cpus", type=float, default=None,
              help="Ray CPUs each replica reserves (default: 1, or a share when the cluster "
              "has fewer CPUs than replicas).")
@click.option("--max-rows", type=int, default=1024, show_default=True,
              help="Most images one request may carry (larger: 400).")
@click.option("--max-pending-rows", type=int, default=None,
              help="Rows one replica holds in flight before it answers 503 (default: "
              "max(4096, 4 x --max-rows)).")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a stop (SIGTERM, SIGINT) waits for requests in flight.")
@click.option("--body-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a request body may take to arrive (slower: 408).")
@click.option("--header-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a request head may take to arrive after connecting or after "
              "the previous response (slower: 408, connection closed).")
@friendly_errors
def serve_cmd(bundle: Path, host: str, port: int, replicas: int, max_batch: int,
              max_delay_ms: float, full: bool, split_stages: bool, thresholds: str | None,
              backend: str, threads: int | None, thread_pool: str,
              replica_cpus: float | None,
              max_rows: int, max_pending_rows: int | None, drain_timeout: float,
              body_timeout: float, header_timeout: float) -> None:
    """Serve BUNDLE over HTTP (Open Inference Protocol v2, tritonclient-compatible) until
    SIGTERM or Ctrl-C, then drain and exit 0. Uses the Ray cluster at RAY_ADDRESS when
    set, else starts Ray locally."""
    from dgconvert.serve import ServeOptions, run_server
    from dgconvert.serve.ingress import GuardOptions

    if split_stages and full:
        raise click.BadParameter("--split-stages serves the gated stages; drop --full",
                                 param_hint="--full")
    try:
        options = ServeOptions(replicas=replicas, max_batch=max_batch,
                               max_delay_ms=max_delay_ms, full=full,
                               thresholds=parse_floats(thresholds), backend=backend,
                               threads=threads, thread_pool=thread_pool,
                               replica_cpus=replica_cpus, max_rows=max_rows,
                               max_pending_rows=max_pending_rows,
                               drain_timeout_s=drain_timeout)
        guard = GuardOptions(body_timeout_s=body_timeout, header_timeout_s=header_timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    run_server(bundle, options, host=host, port=port, split_stages=split_stages,
               guard=guard, echo=click.echo, ignore_signals_after=True)
