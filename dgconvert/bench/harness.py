"""Timing loop: every system on the same images, interleaved, with warm-up and repeats.

For each batch size ``B`` the timed images are the first ``B * floor(samples / B)`` of the
data set; a *pass* runs one system over them in batches of ``B``. Passes are interleaved
round-robin (``full, gated, torch-full, …, stages``; the order rotates every repeat) so
that a change in machine load hits every system alike, and ratios (speed-up, efficiency)
are taken between passes of the same round before their median is reported. The first
``warmup`` rounds are not recorded. Accuracy and exit histograms come from one untimed
pass over the whole data set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.bench.errors import BenchError
from dgconvert.bench.machine import load_average, machine_info
from dgconvert.bench.measurements import Measurements
from dgconvert.bench.memory import PeakMemory
from dgconvert.bench.report import BenchReport, build_results, stage_ms
from dgconvert.bench.shared_process import SharedPoolGated
from dgconvert.bench.systems import (
    OnnxFull,
    OnnxGated,
    PrefixProbe,
    StageProbe,
    System,
    TorchFull,
    TorchMasked,
    default_sessions,
)
from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GatedResult
from dgconvert.runtime.thread_pool import shared_threads


@dataclass
class BenchConfig:
    """How to measure. ``samples``: images per timed pass (rounded down to whole batches)."""

    batch_sizes: Sequence[int] = (1, 8, 64, 256)
    repeats: int = 5
    warmup: int = 1
    samples: int = 1024
    torch_samples: int = 256  # PyTorch eager is slow: fewer images per pass (>= 1 batch)
    progress: bool = True

    def check(self, n_images: int) -> list[int]:
        """Validate; return the batch sizes that fit the data (sorted, unique)."""
        sizes = sorted({int(b) for b in self.batch_sizes})
        if not sizes or sizes[0] < 1:
            raise BenchError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}; "
                             "fix: --batch-size 1,8,64,256")
        if self.repeats < 1 or self.warmup < 0:
            raise BenchError(f"got repeats={self.repeats}, warmup={self.warmup}; expected "
                             "repeats >= 1 and warmup >= 0 (fix: --repeats 5 --warmup 1)")
        pool = min(self.samples, n_images)
        if pool < sizes[0]:
            raise BenchError(
                f"only {pool} images to time (data set {n_images}, samples {self.samples}) but the "
                f"smallest batch size is {sizes[0]}; expected at least one full batch. Fix: more "
                "data (--limit), a larger --samples, or smaller --batch-size values."
            )
        return sizes


#: pause after a system whose thread pool spins (a default ONNX Runtime session)
SETTLE_S = 0.1


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="bench", unit="pass", disable=not enabled, leave=False)


def measure(
    systems: Sequence[System],
    images: np.ndarray,
    config: BenchConfig,
    num_stages: int,
    probe: StageProbe | None = None,
    prefix: PrefixProbe | None = None,
) -> Measurements:
    """Time every system (and the stage and prefix probes) at every batch size, interleaved."""
    sizes = config.check(len(images))
    pool = min(config.samples, len(images))
    mem = PeakMemory()
    m = Measurements()
    probes = {id(p): rec for p, rec in ((probe, m.stage_seconds), (prefix, m.prefix_seconds))
              if p is not None}
    runners: list[Any] = [*systems, *(p for p in (probe, prefix) if p is not None)]
    fits = [b for b in sizes if b <= pool]
    m.skipped = [b for b in sizes if b > pool]
    bar = _progress(len(fits) * (config.warmup + config.repeats) * len(runners), config.progress)
    for b in fits:
        batches = [images[i:i + b] for i in range(0, (pool // b) * b, b)]
        share = {item.id: batches[:max(1, min(len(batches), _cap(item, config) // b))]
                 for item in runners}
        for item in runners:
            m.images.setdefault(item.id, {})[b] = len(share[item.id]) * b
        for rnd in range(config.warmup + config.repeats):
            record = rnd >= config.warmup
            shift = rnd % len(runners)
            for item in runners[shift:] + runners[:shift]:
                bar.set_postfix_str(f"batch {b}, {item.id}", refresh=False)
                mine = share[item.id]
                if id(item) in probes:
                    item.reset()
                    if hasattr(item, "run_all"):
                        item.run_all(mine, SETTLE_S)
                    else:
                        for xb in mine:
                            item.run(xb)
                    if getattr(item, "spins", False):
                        time.sleep(SETTLE_S)  # its spinning workers must not slow the next
                    if record:
                        probes[id(item)].setdefault(b, []).append(list(item.seconds))
                    bar.update(1)
                    continue
                item.reset_rows()
                if hasattr(item, "timed_pass"):  # it runs (and times) in its own process
                    before = peak = None
                    dt = item.timed_pass(mine)
                else:
                    before = mem.start()
                    clock = time.perf_counter
                    t0 = clock()
                    for xb in mine:
                        item.predict(xb)
                    dt = clock() - t0
                    peak = mem.peak()
                if getattr(item, "spins", False):
                    time.sleep(SETTLE_S)  # its spinning workers must not slow the next system
                if record:
                    m.seconds.setdefault(item.id, {}).setdefault(b, []).append(dt)
                    m.rows.setdefault(item.id, {})[b] = item.rows_per_stage(len(mine) * b,
                                                                             num_stages)
                    if peak is not None:
                        old = m.peak.setdefault(item.id, {}).get(b, (0, 0))
                        delta = peak - before if before is not None else 0
                        m.peak[item.id][b] = (max(old[0], peak), max(old[1], delta))
                bar.update(1)
    bar.close()
    m.memory_method = mem.describe()
    return m


def _cap(item: System | StageProbe | PrefixProbe, config: BenchConfig) -> int:
    """Images per timed pass for this system."""
    if getattr(item, "framework", "onnx") == "torch":
        return min(config.samples, config.torch_samples)
    return config.samples


def predict_all(system: System, images: np.ndarray, batch_size: int) -> GatedResult:
    """One untimed pass over every image (accuracy and exit histogram)."""
    parts = [system.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        return GatedResult.empty()
    return GatedResult(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("labels", "exit_stage", "scores")))


def load_torch_model(path: str | Path) -> Any:
    """A GatedNetwork from ``path`` (``dgconvert.load``), in eval mode."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise BenchError(
            f"--model {path} needs PyTorch, which is not installed; expected torch for the "
            "torch-full and torch-masked systems. Fix: pip install 'dgconvert[export]', or drop --model."
        ) from exc
    from dgconvert.gating.persist import load

    return load(path).eval()


@contextmanager
def torch_threads(threads: int | None, enabled: bool) -> Iterator[None]:
    """Run PyTorch with ``threads`` intra-op threads (default: all usable cores), then put
    the process-wide setting back."""
    if not enabled:
        yield
        return
    from dgconvert.gating.threads import torch_threads as set_threads
    from dgconvert.runtime.onnxruntime_backend import default_threads

    with set_threads(threads or default_threads()):
        yield


def run_benchmark(
    bundle: str | Path | Bundle,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    config: BenchConfig | None = None,
    backend: str = "auto",
    threads: int | None = None,
    thresholds: Sequence[float] | None = None,
    model: Any = None,
    operating_points: Mapping[str, Sequence[float]] | None = None,
    backend_options: Mapping[str, Any] | None = None,
    data_name: str = "",
    shared_pool: bool = True,
) -> BenchReport:
    """Benchmark a bundle against the full model (and PyTorch when ``model`` is given).

    ``images``: uint8 pixels or normalized float32 ``[N, *input_shape]``; ``labels`` (int64
    ``[N]``) give accuracies. ``thresholds`` override the bundle's; ``operating_points``
    (name -> thresholds) add one gated system each (``gated[name]``) to the same run.
    ``model``: a GatedNetwork or a checkpoint path for the PyTorch systems.
    ``shared_pool``: on ONNX Runtime on the CPU, also the gated runner on one shared thread
    pool in a process of its own (``gated-shared``, :mod:`dgconvert.bench.shared_process`).
    """
    from dgconvert.runtime import GatedRunner, create_backend

    config = config or BenchConfig()
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    if labels is not None and len(labels) != len(images):
        raise BenchError(f"got {len(labels)} labels for {len(images)} images; expected one per image")
    sizes = config.check(len(images))
    opts = dict(backend_options or {})
    if threads:
        opts["threads"] = threads
    load_start = load_average()
    be, reason = create_backend(b, backend, **opts)
    max_batch = max(sizes)
    main = GatedRunner(b, backend=be, thresholds=list(thresholds) if thresholds is not None else None,
                       max_batch=max_batch)
    systems: list[System] = [OnnxFull(main), OnnxGated(main)]
    onnx_cpu = be.name == "onnxruntime"
    if onnx_cpu:
        systems += default_sessions(main)
    if onnx_cpu and shared_pool and shared_threads() is None:
        systems.append(SharedPoolGated(str(b.path), main.thresholds, be.threads, max_batch,
                                       opts))
    for name, t in (operating_points or {}).items():
        r = GatedRunner(b, backend=be, thresholds=list(t), max_batch=max_batch)
        systems.append(OnnxGated(r, id=f"gated[{name}]", label=f"gated {name} ({be.name}, ours)"))
    net = None
    if model is not None:
        net = model if hasattr(model, "gated_forward") else load_torch_model(model)
        systems += [TorchFull(net), TorchMasked(net, main.thresholds)]
    probe = StageProbe(main)
    prefix = (PrefixProbe(main, getattr(be, "threads", threads), getattr(be, "spinning", False))
              if onnx_cpu else None)
    try:
        with torch_threads(threads, net is not None):
            meas = measure(systems, images, config, b.num_stages, probe, prefix)
            preds = {s.id: predict_all(s, images, max_batch) for s in systems}
    finally:
        for s in systems:
            s.close()
        be.close()
    results = build_results(b, systems, meas, preds, labels)
    return BenchReport(
        bundle=str(b.path),
        data=data_name,
        num_images=len(images),
        thresholds=main.thresholds,
        backend={"name": be.name, "describe": be.describe(), "reason": reason,
                 "paths": main.paths.describe(),
                 "threads": getattr(be, "threads", threads),
                 "fast_paths_off": be.fast_paths_off()},
        config={"batch_sizes": sizes, "repeats": config.repeats, "warmup": config.warmup,
                "samples": config.samples, "torch_samples": config.torch_samples},
        machine={**machine_info(), "load_average_start": load_start},
        flops={"full": b.full_flops, "stages": b.stage_flops, "gates": b.gate_flops,
               "exit_costs": b.exit_costs()},
        stages=[{"batch_size": bs, "images": meas.images[probe.id][bs],
                 "stage_ms_per_image": stage_ms(meas, bs),
                 "prefix_ms_per_image": stage_ms(meas, bs, "prefixes") or None}
                for bs in sorted(meas.stage_seconds)],
        results=results,
        memory_method=meas.memory_method,
        skipped_batch_sizes=meas.skipped,
    )
