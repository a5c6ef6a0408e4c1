"""The systems a benchmark compares, behind one small interface.

=================  =====================================================================
``full``           ``full.onnx`` (the ungated model) on the same backend and sessions' options
``gated``          :class:`~dgconvert.runtime.GatedRunner`: staged graphs, batch compaction (ours)
``torch-full``     the PyTorch eager ungated model (``GatedNetwork.forward``)
``torch-masked``   the naive PyTorch gated model: every sample through every stage and gate,
                   exits applied as a mask afterwards (``GatedNetwork.gated_forward``, what
                   the papers' code does)
``full-default``   ``full.onnx`` in a default ONNX Runtime session (what a user would run
                   instead of dgconvert); for an int8 bundle, its fp32 source's
``full-int8-default``  int8 bundles: their ``full.onnx`` (ORT's ``quantize_static`` of the
                   fp32 one) in a default session
=================  =====================================================================

For an int8 bundle the prefixes (the physical limit) are cut from its int8 stage graphs.

Every system receives the same batches (uint8 pixels or float32) and does its own
preprocessing, so that cost is in every measurement alike. :class:`StageProbe` times each
stage graph alone on full batches (no exits), for the time-based ideal.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgconvert.bench.measurements import FULL_DEFAULT, FULL_INT8_DEFAULT
from dgconvert.core.exits import GatedResult
from dgconvert.runtime.base import Backend
from dgconvert.runtime.onnxruntime_backend import default_threads, direct_run, session_options
from dgconvert.runtime.passes.prefix import prefix_graphs
from dgconvert.runtime.runner import GatedRunner
from dgconvert.runtime.thread_pool import new_session_options, shared_threads


def _ungated(labels: np.ndarray, last: int) -> GatedResult:
    """A full model's prediction: every sample leaves at the final stage (no scores)."""
    n = len(labels)
    return GatedResult(labels, np.full(n, last, np.int64), np.full(n, np.nan, np.float32))


class System(abc.ABC):
    """One thing to time: takes a batch of images, returns labels and exit stages."""

    id: str = ""
    label: str = ""
    kind: str = "full"  # "full" or "gated"
    framework: str = "onnx"  # "onnx" or "torch"
    reference: str | None = None  # id of the full system speed-up / efficiency refer to
    thresholds: list[float] | None = None
    #: its thread pool keeps spinning after a run (ORT's default): the harness lets it go
    #: idle before timing the next system, which it would otherwise slow down
    spins: bool = False

    @abc.abstractmethod
    def predict(self, images: np.ndarray) -> GatedResult:
        """Labels and exit stages (and scores, where the system has them) for one batch."""

    def reset_rows(self) -> None:  # noqa: B027 - optional hook
        """Start counting the rows each stage processes."""

    def rows_per_stage(self, n: int, num_stages: int) -> list[int]:
        """Rows each stage processed since :meth:`reset_rows` (``n`` images went in); by
        default every stage saw every row (full models, the masked model)."""
        return [n] * num_stages

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the system holds."""


def _spins(runner: GatedRunner) -> bool:
    """Whether some of the runner's sessions keep spinning after a run."""
    spins = getattr(runner.backend, "spins_after_run", None)
    return bool(spins and spins(runner.exit_rule.never_exits))


class OnnxFull(System):
    """``full.onnx`` through the runner's backend (same sessions' options as the stages)."""

    kind, framework = "full", "onnx"

    def __init__(self, runner: GatedRunner, id: str = "full") -> None:
        self.runner, self.id, self.spins = runner, id, _spins(runner)
        self.label = f"full model ({runner.backend_name})"
        self._last = runner.bundle.num_stages - 1

    def predict(self, images: np.ndarray) -> GatedResult:
        labels = self.runner.full_logits(images).argmax(axis=1).astype(np.int64)
        return _ungated(labels, self._last)


class OnnxGated(System):
    """The staged runner with batch compaction (exited rows never reach deeper stages)."""

    kind, framework = "gated", "onnx"

    def __init__(self, runner: GatedRunner, id: str = "gated", reference: str = "full",
                 label: str | None = None) -> None:
        self.runner, self.id, self.reference = runner, id, reference
        self.thresholds, self.spins = runner.thresholds, _spins(runner)
        self.label = label or f"gated, compacted ({runner.backend_name}, ours)"

    def predict(self, images: np.ndarray) -> GatedResult:
        return self.runner.predict(images)

    def reset_rows(self) -> None:
        self.runner.reset_stats()

    def rows_per_stage(self, n: int, num_stages: int) -> list[int]:
        return self.runner.stats


class OnnxFullDefault(System):
    """``full.onnx`` in a default ``onnxruntime.InferenceSession`` (no tuning at all), except
    its intra-op thread count when the run's backend uses fewer threads than there are
    cores (a user limited to T threads sets ``intra_op_num_threads=T`` and nothing else)."""

    kind, framework = "full", "onnx"
    spins = True

    def __init__(self, runner: GatedRunner, id: str = FULL_DEFAULT, path: Any = None,
                 label: str = "full model (default ONNX Runtime session)") -> None:
        import onnxruntime as ort

        self.runner, self.id, self.label = runner, id, label
        so = new_session_options()
        threads = getattr(runner.backend, "threads", None)
        if shared_threads() is not None:
            self.label = f"{label}, on the process's shared pool of {shared_threads()} threads"
        elif threads and threads < default_threads():
            so.intra_op_num_threads = threads
            self.label = f"{label}, {threads} thread(s)"
        self._sess = ort.InferenceSession(str(path or runner.bundle.full_file()), so,
                                          providers=["CPUExecutionProvider"])
        self._input = self._sess.get_inputs()[0].name
        self._last = runner.bundle.num_stages - 1

    def predict(self, images: np.ndarray) -> GatedResult:
        x = self.runner.prepare(images)
        labels = self._sess.run(None, {self._input: x})[0].argmax(axis=1).astype(np.int64)
        return _ungated(labels, self._last)

    def close(self) -> None:
        self._sess = None


def default_sessions(runner: GatedRunner) -> list[System]:
    """The full models a user would run instead, in default sessions: ``full.onnx``; for an
    int8 bundle its own (``full-int8-default``) and its fp32 source's when found beside it."""
    q = runner.bundle.manifest.quantization
    if q is None:
        return [OnnxFullDefault(runner)]
    from dgconvert.convert.quantize import QuantizeError, find_source

    out: list[System] = [OnnxFullDefault(
        runner, FULL_INT8_DEFAULT,
        label=f"full model {q.precision} (ORT quantize_static, default session)")]
    try:
        src = find_source(runner.bundle)
    except QuantizeError:
        return out
    return [OnnxFullDefault(runner, FULL_DEFAULT, src.full_file(),
                            f"full model fp32 ({src.path.name}, default session)"), *out]


class TorchFull(System):
    """PyTorch eager, the ungated model."""

    kind, framework = "full", "torch"

    def __init__(self, net: Any, id: str = "torch-full") -> None:
        self.net, self.id = net.eval(), id
        self.label = "full model (PyTorch eager)"
        self._last = net.num_gates

    def _input(self, images: np.ndarray) -> Any:
        import torch

        from dgconvert.core.preprocess import prepare_images

        x = prepare_images(images, self.net.input_shape, self.net.normalization)
        return torch.from_numpy(x)

    def predict(self, images: np.ndarray) -> GatedResult:
        import torch

        with torch.inference_mode():
            labels = self.net(self._input(images)).argmax(dim=1).numpy().astype(np.int64)
        return _ungated(labels, self._last)


class TorchMasked(TorchFull):
    """PyTorch eager, gated the naive way: all stages for all samples, then mask."""

    kind = "gated"

    def __init__(self, net: Any, thresholds: list[float], id: str = "torch-masked",
                 reference: str = "torch-full") -> None:
        super().__init__(net, id)
        self.thresholds, self.reference = [float(t) for t in thresholds], reference
        self.label = "gated, masked (PyTorch eager, naive)"

    def predict(self, images: np.ndarray) -> GatedResult:
        import torch

        with torch.inference_mode():
            return self.net.gated_forward(self._input(images), self.thresholds,
                                          return_scores=True)


class PrefixProbe:
    """Times the ungated prefix of the full model up to each exit point on full batches
    (:mod:`dgconvert.runtime.passes.prefix`): what a sample exiting there pays at least.

    An honest limit is the fastest a plain session runs: each prefix is timed with spinning
    on (ORT's default) and off, and the faster of the two counts (per prefix and round).
    :meth:`run_all` times one prefix session on every batch before the next, and lets
    spinning workers go idle in between, so no idle pool slows the one being timed.
    ``spins``: the harness lets the spinning workers go idle after."""

    id = "prefixes"
    label = "ungated prefixes up to each exit (physical limit)"
    spins = True

    def __init__(self, runner: GatedRunner, threads: int | None = None,
                 spinning: bool | str = False) -> None:
        import onnx
        import onnxruntime as ort

        b = runner.bundle
        models = prefix_graphs([onnx.load(str(b.stage_file(k))) for k in range(b.num_stages)],
                               onnx.load(str(b.full_file())))
        self.runner = runner
        self.settings = [True, False] if spinning in (True, False) else [True, False, spinning]
        self._sessions = [[ort.InferenceSession(m.SerializeToString(),
                                                session_options(threads, spin),
                                                providers=["CPUExecutionProvider"])
                           for m in models] for spin in self.settings]
        first = self._sessions[0]
        self._inputs = [s.get_inputs()[0].name for s in first]
        self._outputs = [[s.get_outputs()[0].name] for s in first]
        # the call the runner makes, per setting
        self._runs = [[direct_run(s) for s in sessions] for sessions in self._sessions]
        self.seconds: list[float] = []
        self._by_setting: list[list[float]] = []

    def reset(self) -> None:
        self._by_setting = [[0.0] * len(self._inputs) for _ in self.settings]
        self.seconds = [0.0] * len(self._inputs)

    def run(self, images: np.ndarray) -> None:
        self.run_all([images])

    def run_all(self, batches: Sequence[np.ndarray], settle_s: float = 0.0) -> None:
        """Time each prefix session on all ``batches`` in turn, preprocessing included as in
        every system (``settle_s`` of idle after one whose workers spin)."""
        prepare, clock = self.runner.prepare, time.perf_counter
        for spin, runs, seconds in zip(self.settings, self._runs, self._by_setting,
                                       strict=True):
            for k, (run, name, out) in enumerate(zip(runs, self._inputs, self._outputs,
                                                     strict=True)):
                t0 = clock()
                for b in batches:
                    run(out, {name: prepare(b)}, None)
                seconds[k] += clock() - t0
                if spin is True and settle_s:
                    time.sleep(settle_s)
        self.seconds = [min(v) for v in zip(*self._by_setting, strict=True)]


@dataclass
class StageProbe:
    """Times each stage graph alone on full batches: the chain with nobody exiting."""

    runner: GatedRunner
    seconds: list[float] = field(default_factory=list)
    id: str = "stages"
    label: str = "stage graphs alone (no exits)"

    def reset(self) -> None:
        self.seconds = [0.0] * self.runner.bundle.num_stages

    def run(self, images: np.ndarray) -> None:
        backend: Backend = self.runner.backend
        x = self.runner.prepare(images)
        keep = np.arange(len(x), dtype=np.int64)
        clock = time.perf_counter
        t0 = clock()
        out = backend.run_stage(0, x, None)
        t1 = clock()
        self.seconds[0] += t1 - t0
        for k in range(1, len(self.seconds)):
            t0 = clock()
            out = backend.run_stage(k, out.features, keep)
            self.seconds[k] += clock() - t0
