"""``--split-stages``: one Ray Serve deployment per stage, each sized to its load.

The ingress deployment speaks the protocol; stage k's deployment runs stage k on batches
of survivors from many requests (``serve.batch``), and returns every row's gate score and
label plus the features of the rows that continue, already compacted. The ingress decides
exits with the same float32 comparison as :class:`GatedRunner` and sends the survivors on.

Replicas per stage follow the stage's load: the fraction of samples that reach it (from
the calibrated exit fractions in the manifest) times its FLOPs (E3-style sizing).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import ExitRule, GatedResult
from dgconvert.core.preprocess import prepare_images
from dgconvert.serve.common import (
    RayMetrics,
    ServeOptions,
    model_name,
    model_spec,
    replica_cpus,
    require_ray,
    respond,
)
from dgconvert.serve.faults import RetryingHandle
from dgconvert.serve.server import OIPServer


def exit_thresholds(values: list[float]) -> np.ndarray:
    """float32 thresholds as compared (``score >= t``): a gate that is off is NaN (never)."""
    return ExitRule.from_thresholds(values).exit_at


def stage_loads(bundle: Bundle) -> tuple[list[float], str]:
    """Relative load of each stage (reach fraction x FLOPs) and where the fractions came
    from (the manifest's calibration, else "no calibration: every sample reaches every
    stage")."""
    k = bundle.num_stages
    fractions = (bundle.manifest.calibration or {}).get("exit_fractions")
    if isinstance(fractions, list) and len(fractions) == k and all(
            isinstance(f, int | float) and f >= 0 for f in fractions) and sum(fractions) > 0:
        f = np.asarray(fractions, float) / float(sum(fractions))
        source = "calibrated exit fractions"
    else:
        f = np.zeros(k)
        f[-1] = 1.0
        source = "no calibrated exit fractions: every sample assumed to reach every stage"
    reach = ExitRule.reach(f, total=1.0)
    flops = np.asarray(bundle.stage_flops, float)
    flops = np.where(flops > 0, flops, 1.0)
    return [float(v) for v in np.clip(reach, 0, 1) * flops], source


def plan_replicas(loads: list[float], total: int) -> list[int]:
    """Replicas per stage: at least one each, ``max(total, len(loads))`` in all, the rest
    given in proportion to ``loads`` (largest remainder)."""
    n = len(loads)
    total = max(total, n)
    w = np.asarray(loads, float)
    w = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
    extra = total - n
    share = w * extra
    out = np.floor(share).astype(int)
    for i in np.argsort(-(share - out), kind="stable")[: extra - int(out.sum())]:
        out[i] += 1
    return [int(v) + 1 for v in out]


class StageWorker:
    """Stage ``k`` of a bundle; calls made at the same time run as one batch."""

    def __init__(self, bundle: str, k: int, options: dict[str, Any]) -> None:
        from dgconvert.runtime import GatedRunner

        opts = ServeOptions(**options)
        opts.use_thread_pool()
        # features cross deployments as host arrays in the contract's layout
        kw = {**opts.runner_kwargs(), "backend": "onnxruntime", "compose": False,
              "fuse_boundaries": False}
        self.runner = GatedRunner(bundle, max_batch=None, **kw)
        self.k = k
        self.last = k == self.runner.bundle.num_stages - 1
        self.rule = self.runner.exit_rule
        from ray import serve

        async def run_list(parts: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
            return await asyncio.to_thread(self.run_batch, parts)

        self._batched = serve.batch(max_batch_size=opts.max_batch,
                                    batch_wait_timeout_s=opts.max_delay_ms / 1000.0)(run_list)

    def run_batch(self, parts: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
        """Run the stage on the rows of every part; per part: score, label, survivors'
        features (None on the last stage)."""
        sizes = [len(p) for p in parts]
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        keep = None if self.k == 0 else np.arange(len(x), dtype=np.int64)
        out = self.runner.backend.run_stage(self.k, x, keep)
        feats = None if self.last else np.asarray(out.features)
        res, at = [], 0
        for m in sizes:
            s, lab = out.score[at:at + m], out.label[at:at + m]
            if self.last:
                res.append((s, lab, None))
            else:
                cont = ~self.rule.exits(self.k, s)
                res.append((s, lab, np.ascontiguousarray(feats[at:at + m][cont])))
            at += m
        return res

    async def run(self, part: np.ndarray) -> tuple[np.ndarray, ...]:
        """Score, label and survivors' features of one request's rows (batched with the
        calls that arrive within ``max_delay_ms``)."""
        return await self._batched(part)


class SplitIngress:
    """The protocol side of ``--split-stages``: chains the stage deployments."""

    def __init__(self, bundle: str, options: dict[str, Any], *stages: Any) -> None:
        opts = ServeOptions(**options)
        self.bundle = Bundle.load(bundle)
        # a stage replica that dies mid-call: retried once on a live one, else a 503
        self.stages = tuple(RetryingHandle(s, f"stage {k}") for k, s in enumerate(stages))
        t = opts.thresholds if opts.thresholds is not None else self.bundle.thresholds
        self.rule = ExitRule.from_thresholds(t)
        spec = model_spec(self.bundle)
        self.server = OIPServer(spec, self._infer, max_rows=opts.max_rows,
                                metrics=RayMetrics(spec.name))

    async def _infer(self, images: np.ndarray) -> GatedResult:
        x = prepare_images(images, self.bundle.input_shape, self.bundle.normalization)
        n = len(x)
        res = GatedResult.empty(n)
        rows, feats, last = np.arange(n), x, len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            score, label, survivors = await stage.run.remote(feats)
            if k == last:
                res.fill(rows, label, score, k)
                break
            exits = self.rule.exits(k, score)
            res.fill(rows[exits], label[exits], score[exits], k)
            rows, feats = rows[~exits], survivors
            if not len(rows):
                break
        return res

    async def __call__(self, request: Any) -> Any:
        return await respond(self.server, request)


def build_split_app(bundle: Bundle, options: ServeOptions) -> Any:
    """Ingress + one deployment per stage, replicas from :func:`plan_replicas`."""
    require_ray()
    from ray import serve

    loads, _ = stage_loads(bundle)
    counts = plan_replicas(loads, options.replicas)
    cpus = replica_cpus(options, sum(counts) + 1)
    path, opts, name = str(bundle.path.resolve()), asdict(options), model_name(bundle)
    stages = []
    for k, count in enumerate(counts):
        dep = serve.deployment(StageWorker, name=f"{name}-stage{k}", num_replicas=count,
                               max_ongoing_requests=max(2 * options.max_batch, 64),
                               graceful_shutdown_timeout_s=options.drain_timeout_s,
                               ray_actor_options={"num_cpus": cpus})
        stages.append(dep.bind(path, k, opts))
    ingress = serve.deployment(SplitIngress, name=f"{name}-split",
                               max_ongoing_requests=options.max_ongoing_requests,
                               graceful_shutdown_timeout_s=options.drain_timeout_s,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(path, opts, *stages)
