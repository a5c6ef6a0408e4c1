"""The collection pass: run the bundle once with no exits and keep every gate's score and
label and the final label per sample; cached inside the bundle by a hash of the stage
graphs and of the data, so re-calibrating for another target is instant."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GateRecords
from dgconvert.core.io import atomic_write

CACHE_DIR = "cache"


def bundle_digest(bundle: Bundle) -> str:
    """SHA-256 of the stage graphs (what determines the scores; thresholds excluded)."""
    h = hashlib.sha256()
    for k in range(bundle.num_stages):
        h.update(bundle.stage_file(k).read_bytes())
    return h.hexdigest()


def cache_path(bundle: Bundle, data_fingerprint: str, digest: str | None = None) -> Path:
    """Where the records of these stage graphs (``digest``: :func:`bundle_digest`, computed
    when not given) on this data are cached."""
    digest = digest or bundle_digest(bundle)
    key = hashlib.sha256(f"{digest}:{data_fingerprint}".encode()).hexdigest()
    return bundle.path / CACHE_DIR / f"records-{key[:24]}.npz"


def collect_records(
    bundle: Bundle,
    images: np.ndarray,
    data_fingerprint: str | None = None,
    *,
    backend: str = "auto",
    batch_size: int = 256,
    progress: bool = False,
    digest: str | None = None,
    **backend_options: Any,
) -> tuple[GateRecords, bool]:
    """Gate records for ``images``; returns ``(records, from_cache)``.

    With a ``data_fingerprint`` (e.g. ``Dataset.fingerprint()``) the records are cached in
    ``bundle/cache/`` and reused while the stage graphs and the data are unchanged
    (``digest``: the stage graphs' :func:`bundle_digest`, if the caller has it already).
    """
    from dgconvert.runtime import GatedRunner

    path = cache_path(bundle, data_fingerprint, digest) if data_fingerprint else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            if len(z["final_labels"]) == len(images):
                return GateRecords(z["scores"], z["labels"], z["final_labels"]), True
    runner = GatedRunner(bundle, backend=backend, max_batch=batch_size, **backend_options)
    parts = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="collect gate scores", unit="batch", leave=False)
    for s in starts:
        parts.append(runner.collect(images[s : s + batch_size]))
    runner.close()
    records = GateRecords(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.final_labels for p in parts]),
    )
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, scores=records.scores, labels=records.labels, final_labels=records.final_labels)
        atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))
    return records, False


def latency_exit_costs(
    bundle: Bundle,
    images: np.ndarray,
    *,
    backend: str = "auto",
    batch_size: int = 64,
    repeats: int = 3,
    **backend_options: Any,
) -> list[float]:
    """Cumulative measured ms/image of exiting at each point (each stage timed alone on full
    batches of ``batch_size`` on the chosen backend)."""
    from dgconvert.bench.systems import StageProbe
    from dgconvert.runtime import GatedRunner

    runner = GatedRunner(bundle, backend=backend, max_batch=batch_size, **backend_options)
    probe = StageProbe(runner)
    x = images[: max(batch_size, min(len(images), 4 * batch_size))]
    probe.reset()
    probe.run(x[:batch_size])  # warm-up
    probe.reset()
    for _ in range(repeats):
        for s in range(0, len(x) - batch_size + 1, batch_size):
            probe.run(x[s : s + batch_size])
    runner.close()
    rows = repeats * (len(x) // batch_size) * batch_size
    per_stage = [1000.0 * t / rows for t in probe.seconds]
    return list(np.cumsum(per_stage))
