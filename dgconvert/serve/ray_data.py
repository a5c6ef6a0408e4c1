"""Offline scale-out with Ray Data: :class:`GatedPredictor` for ``Dataset.map_batches``
(one :class:`GatedRunner` per actor), and :func:`predict_dataset` for an in-memory array
(what ``dgconvert predict --ray`` runs)::

    ds.map_batches(GatedPredictor, fn_constructor_kwargs={"bundle": "model.dg"},
                   concurrency=4, batch_size=256, batch_format="numpy")

adds ``label``, ``exit_stage`` and ``score`` columns to every batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.errors import InputError
from dgconvert.core.exits import GatedResult

OUTPUT_COLUMNS = ("label", "exit_stage", "score")


class GatedPredictor:
    """A callable class for ``Dataset.map_batches``: the images in ``column`` through the
    gated bundle; the batch comes back with ``label``/``exit_stage``/``score`` added
    (``keep_input=False``: those three columns only)."""

    def __init__(self, bundle: str | Path, column: str = "image",
                 thresholds: list[float] | None = None, keep_input: bool = True,
                 backend: str = "onnxruntime", **runner_options: Any) -> None:
        from dgconvert.runtime import GatedRunner

        self.runner = GatedRunner(bundle, backend=backend, thresholds=thresholds,
                                  **runner_options)
        self.column = column
        self.keep_input = keep_input

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise InputError(f"the batch has columns {sorted(batch)}; expected the images in "
                             f"column {self.column!r}. Fix: GatedPredictor(..., column=NAME)")
        images = batch[self.column]
        if images.dtype == object:  # ragged rows come as an object array of arrays
            images = np.stack(list(images))
        res = self.runner.predict(images)
        out = dict(batch) if self.keep_input else {}
        out.update(label=res.labels, exit_stage=res.exit_stage, score=res.scores)
        return out


def predict_dataset(bundle: str | Path, images: np.ndarray, *, workers: int = 1,
                    batch_size: int = 256, thresholds: list[float] | None = None,
                    threads: int | None = None, cpus_per_worker: float | None = None
                    ) -> GatedResult:
    """Predict ``images`` with ``workers`` Ray Data actors; the result in input order.

    ``cpus_per_worker`` (Ray CPUs each actor reserves) defaults to 1, or an equal share of
    what the cluster has free (a share kept for Ray Data's own tasks) when that is less.

    Uses the running Ray (``RAY_ADDRESS`` for a cluster) or starts a local one."""
    from dgconvert.serve.common import require_ray

    ray = require_ray()
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    import ray.data

    if workers < 1 or batch_size < 1:
        raise InputError(f"workers={workers}, batch_size={batch_size}; expected both >= 1")
    if len(images) == 0:
        return GatedResult.empty()
    if cpus_per_worker is None:
        free = float(ray.available_resources().get("CPU", 0.0))
        cpus_per_worker = min(1.0, free / (workers + 1))
    ctx = ray.data.DataContext.get_current()
    order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # results in input order
    opts: dict[str, Any] = {"threads": threads} if threads else {}
    try:
        ds = ray.data.from_numpy(np.ascontiguousarray(images))
        out = ds.map_batches(
            GatedPredictor, batch_size=batch_size, batch_format="numpy", concurrency=workers,
            fn_constructor_kwargs={"bundle": str(bundle), "column": "data",
                                   "thresholds": thresholds, "keep_input": False, **opts},
            num_cpus=cpus_per_worker)
        parts = list(out.iter_batches(batch_format="numpy", batch_size=None))
    finally:
        ctx.execution_options.preserve_order = order
    cols = {c: np.concatenate([p[c] for p in parts]) for c in OUTPUT_COLUMNS}
    return GatedResult(cols["label"].astype(np.int64), cols["exit_stage"].astype(np.int64),
                       cols["score"].astype(np.float32))
