"""Check every exported stage (and the whole chain) against PyTorch; report all mismatches.

Per stage, on real inputs and several ``keep`` vectors (all rows, a random subset,
``M = 0``, ``M = 1``, repeated and unordered indices) we compare every output: float
outputs within ``atol + rtol * |ref|`` plus twice torch's own float32 deviation from a
float64 run of the same module (:class:`Float64Noise`); labels exactly, except where the
reference's two best logits are closer than the tolerance (a tie that float noise may
break). Then the
runtime chain is compared with :meth:`GatedNetwork.gated_forward` sample by sample, with
thresholds at which samples exit at every gate. A network converted from a multi-exit model
(:meth:`GatedNetwork.from_multi_exit`) is also checked against the model's *own* outputs:
the runtime's labels and exit stages equal the score rule applied to the model's list of
exit logits, sample by sample, at several threshold sets. Mismatches are collected and
raised once as :class:`~dgconvert.core.errors.ExportVerificationError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import ExportVerificationError
from dgconvert.core.exits import ExitRule
from dgconvert.core.gates import exit_head_score
from dgconvert.gating.configs import MultiExitConfig
from dgconvert.gating.families import family_of
from dgconvert.gating.multi_exit import own_exit_outputs
from dgconvert.gating.network import GatedNetwork
from dgconvert.runtime.onnxruntime_backend import OnnxRuntimeBackend
from dgconvert.runtime.runner import GatedRunner
from dgconvert.runtime.thread_pool import new_session_options

log = logging.getLogger(__name__)


@dataclass
class VerificationReport:
    """What was compared and the worst differences seen."""

    checks: int = 0
    max_abs: dict[str, float] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    def record(self, key: str, diff: float) -> None:
        self.max_abs[key] = max(self.max_abs.get(key, 0.0), diff)


def keep_vectors(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The ``keep`` cases each stage is checked with."""
    cases = {
        "all": np.arange(n),
        "subset": np.sort(rng.choice(n, size=max(1, n // 2), replace=False)),
        "empty": np.zeros(0, np.int64),
        "single": np.array([n - 1]),
        "repeated-unordered": rng.integers(0, n, size=n + 3),
    }
    return {k: v.astype(np.int64) for k, v in cases.items()}


def tie_rows(logits: np.ndarray, tol: float) -> np.ndarray:
    """Rows whose two largest logits lie within ``tol``: their label may flip on float noise."""
    if logits.shape[1] < 2 or len(logits) == 0:
        return np.zeros(len(logits), bool)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= tol


class Float64Noise:
    """Lazily, per output: how far torch's own float32 result is from the same module run in
    float64 — the float noise of this computation. A deep network accumulates more of it
    than any fixed ``atol`` (Inception-v3: 1.1e-3 on logits of scale 10), so an exported
    graph may differ from torch by up to twice this (both sides carry it)."""

    def __init__(self, module: torch.nn.Module, args: Sequence[torch.Tensor]) -> None:
        self._module, self._args = module, args
        self._noise: list[float] | None = None

    def __call__(self) -> list[float]:
        if self._noise is None:
            try:  # a module that cannot run in float64 gets no allowance
                wide = copy.deepcopy(self._module).double()
                args64 = [a.double() if a.is_floating_point() else a for a in self._args]
                with torch.no_grad():
                    lo, hi = _as_list(self._module(*self._args)), _as_list(wide(*args64))
            except (RuntimeError, TypeError):
                lo = hi = []
            self._noise = [
                float((a.double() - b).abs().max()) if a.is_floating_point() and a.numel() else 0.0
                for a, b in zip(lo, hi, strict=True)
            ]
        return self._noise


def _as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def compare_outputs(
    report: VerificationReport,
    where: str,
    names: list[str],
    got: list[np.ndarray],
    ref: list[np.ndarray],
    atol: float,
    rtol: float,
    noise: Callable[[], list[float]] | None = None,
) -> None:
    """Record a mismatch per output outside ``atol + rtol * |ref|``; with ``noise``, a float
    output within that tolerance plus twice torch's own float noise passes."""
    logits_name = CONTRACT.logits_of(names)
    ref_by = dict(zip(names, ref, strict=True))
    for i, (name, g, r) in enumerate(zip(names, got, ref, strict=True)):
        report.checks += 1
        if g.shape != r.shape:
            report.mismatches.append(f"{where} {name}: shape {g.shape}, torch {r.shape}")
            continue
        if g.size == 0:
            continue
        if name == CONTRACT.label:
            bad = (g != r) & ~tie_rows(ref_by[logits_name], atol + rtol)
            if bad.any():
                report.mismatches.append(
                    f"{where} label: {int(bad.sum())}/{g.size} rows differ (first rows "
                    f"{np.flatnonzero(bad)[:5].tolist()})"
                )
            continue
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf
            diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        report.record(name, float(diff.max()))
        limit = atol + rtol * np.abs(r)
        if not (diff > limit).any():
            continue
        owns = noise() if noise is not None else []
        own = owns[i] if i < len(owns) else 0.0
        if own and not (diff > limit + 2 * own).any():
            continue
        rel = diff / np.maximum(np.abs(r), 1e-12)
        extra = f"; torch's own float32 noise vs float64: {own:.3g}" if noise is not None else ""
        report.mismatches.append(
            f"{where} {name}: max abs diff {diff.max():.3g}, max rel diff {rel.max():.3g} "
            f"(atol {atol:g}, rtol {rtol:g}{extra})"
        )


@torch.no_grad()
def check_stage_graph(
    path: str,
    module: torch.nn.Module,
    x: torch.Tensor,
    *,
    first: bool,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> bool:
    """Run one exported stage graph in ONNX Runtime at batch sizes other than the export
    example's and compare with ``module``; raise :class:`ExportVerificationError` on a
    mismatch. Stage 0 (``first``) gets ``images``, batch ``len(x) + 3`` and 1; later
    stages ``x`` with ``keep`` vectors of size ``len(x) + 3`` (repeated, unordered), 1 and 0.
    Returns whether ONNX Runtime survives ``M = 0`` (run in a child process: some kernels
    die of a signal on empty batches); when it does not, that case is left out.
    """
    import onnxruntime as ort

    empty_ok = first or _empty_batch_survives(path, x)
    opts = new_session_options()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    report = VerificationReport()
    n = len(x)
    if first:
        reps = (n + 3 + n - 1) // n
        big = x.repeat(reps, *([1] * (x.dim() - 1)))[: n + 3]
        cases = {f"N={len(big)}": (big,), "N=1": (x[:1],)}
    else:
        keep = torch.arange(n + 3).flip(0) % n
        cases = {f"M={n + 3}": (x, keep), "M=1": (x, keep[:1])}
        if empty_ok:
            cases["M=0"] = (x, keep[:0])
    feeds = [i.name for i in sess.get_inputs()]
    for case, args in cases.items():
        try:
            got = sess.run(names, {k: v.numpy() for k, v in zip(feeds, args, strict=True)})
        except Exception as exc:
            raise ExportVerificationError([f"{case}: ONNX Runtime failed: {exc}"]) from exc
        ref = [t.numpy() for t in module(*args)]
        compare_outputs(report, case, names, got, ref, atol, rtol, Float64Noise(module, args))
    if report.mismatches:
        raise ExportVerificationError(report.mismatches)
    return empty_ok


_EMPTY_RUN = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
s.run(None, {"x": x, "keep": np.zeros(0, np.int64)})
"""


def _empty_batch_survives(path: str, x: torch.Tensor) -> bool:
    """Whether ONNX Runtime runs the graph on ``keep`` of size 0, tried in a child process:
    its kernels may die of a signal on empty batches (seen: SIGFPE in ONNX Runtime 1.32's
    ``Einsum`` with a 0-sized batch dim, in MaxViT's window attention), which must not end
    the export.
    Any other failure is an error of the graph."""
    import signal
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        feats = f"{d}/x.npy"
        np.save(feats, x[:2].numpy())
        proc = subprocess.run([sys.executable, "-c", _EMPTY_RUN, str(path), feats],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode < 0:
        log.warning("%s: ONNX Runtime dies of %s on an empty batch (M = 0); recorded in the "
                    "manifest: the runtime never feeds this stage an empty batch", Path(path).name,
                    signal.Signals(-proc.returncode).name)  # fmt: skip
        return False
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["failed"]
        raise ExportVerificationError([f"M=0: ONNX Runtime failed on an empty keep: {last[0]}"])
    return True


def spread_thresholds(net: GatedNetwork, x: torch.Tensor) -> list[float]:
    """Thresholds at which a similar share of samples exits at every gate and at the end."""
    with torch.no_grad():
        return _spread(net.all_exits(x).scores.numpy())


def _spread(scores: np.ndarray) -> list[float]:
    k = scores.shape[1]
    # gate j lets through the top 1/(k+1-j) of the samples still there: quantile per gate
    return [float(np.quantile(scores[:, j], 1 - 1 / (k + 1 - j))) for j in range(k)]


@torch.no_grad()
def verify_bundle(
    net: GatedNetwork,
    bundle: Bundle,
    inputs: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    raise_on_mismatch: bool = True,
) -> VerificationReport:
    """Compare each stage graph, ``full.onnx`` and the runtime chain with torch."""
    rng = np.random.default_rng(seed)
    report = VerificationReport()
    backend = OnnxRuntimeBackend(bundle)
    mods = family_of(net).stage_modules(net)
    n = bundle.num_stages
    x = inputs.float()
    x_np = x.numpy()
    # stage 0 on the real inputs
    names0 = list(CONTRACT.outputs(0, n))
    got = list(backend.run_contract(0, {CONTRACT.images: x_np}).values())
    ref = [t.numpy() for t in mods[0](x)]
    compare_outputs(report, "stage 0", names0, got, ref, atol, rtol, Float64Noise(mods[0], [x]))
    feats = ref[0]
    for k in range(1, n):
        names = list(CONTRACT.outputs(k, n))
        nxt = None
        for case, keep in keep_vectors(len(feats), rng).items():
            if not keep.size and not bundle.manifest.stages[k].empty_batch:
                continue  # recorded at export: the runtime never runs it empty
            got = list(backend.run_contract(k, {CONTRACT.x: feats, CONTRACT.keep: keep}).values())
            args = [torch.from_numpy(feats), torch.from_numpy(keep)]
            ref = [t.numpy() for t in mods[k](*args)]
            compare_outputs(report, f"stage {k} keep={case}[M={keep.size}]", names, got, ref, atol, rtol,
                     Float64Noise(mods[k], args))
            if case == "all":
                nxt = ref[0]
        feats = nxt
    full = backend.run_full(x_np)
    compare_outputs(report, "full.onnx", list(CONTRACT.full_outputs), [full], [net(x).numpy()], atol,
             rtol, Float64Noise(net, [x]))
    # the chain: runtime vs gated_forward, samples exiting at every gate
    exits = net.all_exits(x)  # once: thresholds, reference exits and ties all come from it
    all_scores = exits.scores.numpy()
    t = _spread(all_scores)
    ref_out = net.pick_exits(exits, t)
    near = (np.abs(all_scores - np.asarray(t, np.float32)) <= atol + rtol).any(axis=1)
    check_runner(report, bundle, backend, x_np, t, ref_out.labels, ref_out.exit_stage, near,
                 "chain", "gated_forward")
    if own_exits(net) is not None:
        verify_own_exits(net, bundle, backend, x, report)
    backend.close()
    if report.mismatches and raise_on_mismatch:
        raise ExportVerificationError(report.mismatches)
    return report


def own_exits(net: GatedNetwork) -> MultiExitConfig | None:
    """The config of a network converted from a multi-exit model (whose own exit rule the
    export is checked against too), else None."""
    cfg = net.config
    return cfg if isinstance(cfg, MultiExitConfig) and net.backbone is not None else None


def own_exit_rule(net: GatedNetwork, x: torch.Tensor, thresholds: list[float], tol: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exit rule applied to the original multi-exit model's own outputs (numpy, float64
    scores): ``(labels, exit_stage, near)`` where ``near`` marks samples within ``tol`` of a
    threshold or of a tie between the two best logits of the exit taken."""
    info = own_exits(net)
    if info is None or net.backbone is None:
        raise ValueError("own_exit_rule needs a network built by GatedNetwork.from_multi_exit")
    outs = own_exit_outputs(net.backbone, x, info.outputs)
    scores = np.stack([exit_head_score(lg, c, info.score) for lg, c in outs[:-1]], axis=1)
    labels = np.stack([lg.argmax(axis=1) for lg, _ in outs], axis=1)
    ties = np.stack([tie_rows(lg, tol) for lg, _ in outs], axis=1)
    t = np.asarray(thresholds, np.float64)
    stage = ExitRule.from_thresholds(t, np.float64).points(scores)
    rows = np.arange(len(stage))
    near = (np.abs(scores - t) <= tol).any(axis=1) | ties[rows, stage]
    return labels[rows, stage].astype(np.int64), stage, near


def verify_own_exits(
    net: GatedNetwork,
    bundle: Bundle,
    backend: OnnxRuntimeBackend,
    x: torch.Tensor,
    report: VerificationReport,
) -> None:
    """Runtime vs the multi-exit model's own exit rule, sample by sample, at batch 1, 7 and
    ``len(x)``, with thresholds spread over the gates, lenient and strict ones.

    Samples within float noise of a threshold or of a label tie are not judged: ten times
    the largest difference the stage checks saw (at least 1e-6), so that the clustered
    scores of an untrained model still leave most samples judged."""
    info = own_exits(net)
    if info is None or net.backbone is None:
        raise ValueError("verify_own_exits needs a network built by GatedNetwork.from_multi_exit")
    seen = [report.max_abs.get(k, 0.0) for k in (CONTRACT.score, CONTRACT.gate_logits, CONTRACT.logits)]
    tol = 1e-6 + 10 * max(seen)
    with torch.no_grad():
        scores = net.all_exits(x).scores.numpy()
    sets = {
        "spread": _spread(scores),
        "lenient": np.quantile(scores, 0.5, axis=0).tolist(),
        "strict": np.quantile(scores, 0.9, axis=0).tolist(),
    }
    x_np = x.numpy()
    reference = (f"the {info.score!r} rule applied to {type(net.backbone).__name__}'s own exit "
                 "outputs")
    for name, t in sets.items():
        labels, stage, near = own_exit_rule(net, x, t, tol)
        check_runner(report, bundle, backend, x_np, t, labels, stage, near,
                     f"own exits ({name} thresholds)", reference)


def check_runner(report: VerificationReport, bundle: Bundle, backend: OnnxRuntimeBackend,
                 x: np.ndarray, thresholds: list[float], labels: np.ndarray, stage: np.ndarray,
                 near: np.ndarray, what: str, reference: str) -> None:
    """The runtime at ``max_batch`` 1, 7 and ``len(x)`` against a reference's labels and exit
    stages, sample by sample (``near``: samples float noise may flip, not judged)."""
    for batch in sorted({1, 7, len(x)}):
        res = GatedRunner(bundle, backend=backend, thresholds=thresholds,
                          max_batch=batch).predict(x)
        bad = ((res.labels != labels) | (res.exit_stage != stage)) & ~near
        report.checks += 1
        if bad.any():
            report.mismatches.append(
                f"{what} (max_batch={batch}, thresholds {np.round(thresholds, 4).tolist()}): "
                f"{int(bad.sum())}/{len(x)} samples differ in label or exit stage from "
                f"{reference} (first rows {np.flatnonzero(bad)[:5].tolist()})"
            )
