"""The collection pass: run the bundle once with no exits and keep every gate's score and
label and the final label per sample; cached inside the bundle by a hash of the stage
graphs, of the data and of the backend (name, precision, engines), so re-calibrating for
another target is instant."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dgconvert.core.bundle import Bundle
from dgconvert.core.exits import GateRecords
from dgconvert.core.io import atomic_write
from dgconvert.runtime import GatedRunner

CACHE_DIR = "cache"


def bundle_digest(bundle: Bundle) -> str:
    """SHA-256 of the stage graphs (what determines the scores; thresholds excluded)."""
    h = hashlib.sha256()
    for k in range(bundle.num_stages):
        h.update(bundle.stage_file(k).read_bytes())
    return h.hexdigest()


def engine_identity(backend: Any) -> str:
    """What besides the graphs determines the scores: the backend, its precision and, for
    TensorRT, the engine set (key and SHA-256 of every engine)."""
    record = getattr(backend, "record", None) or {}
    stages = record.get("stages") or []
    parts = {
        "backend": str(getattr(backend, "name", type(backend).__name__)),
        "precision": str(record.get("precision", "fp32")),
        "engines": str(getattr(backend, "key", "")),
        "sha256": [str(s.get("sha256", "")) for s in stages if isinstance(s, dict)],
    }
    return json.dumps(parts, sort_keys=True)


def cache_path(
    bundle: Bundle, data_fingerprint: str, digest: str | None = None, identity: str = ""
) -> Path:
    """Where the records of these stage graphs (``digest``: :func:`bundle_digest`, computed
    when not given) on this data, run by this backend (``identity``: :func:`engine_identity`),
    are cached."""
    digest = digest or bundle_digest(bundle)
    key = hashlib.sha256(f"{digest}:{data_fingerprint}:{identity}".encode()).hexdigest()
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
    write_cache: bool = True,
    **backend_options: Any,
) -> tuple[GateRecords, bool]:
    """Gate records for ``images``; returns ``(records, from_cache)``.

    With a ``data_fingerprint`` (e.g. ``Dataset.fingerprint()``) the records are cached in
    ``bundle/cache/`` and reused while the stage graphs, the data and the backend (name,
    precision, engines) are unchanged (``digest``: the stage graphs' :func:`bundle_digest`,
    if the caller has it already). ``write_cache=False`` reads the cache but never writes.
    """
    runner = GatedRunner(bundle, backend=backend, max_batch=batch_size, **backend_options)
    try:
        path = None
        if data_fingerprint:
            path = cache_path(bundle, data_fingerprint, digest, engine_identity(runner.backend))
        if path is not None and path.is_file():
            with np.load(path) as z:
                if len(z["final_labels"]) == len(images):
                    return GateRecords(z["scores"], z["labels"], z["final_labels"]), True
        parts = []
        starts: Iterable[int] = range(0, len(images), batch_size)
        if progress:
            starts = tqdm(starts, desc="collect gate scores", unit="batch", leave=False)
        for s in starts:
            parts.append(runner.collect(images[s : s + batch_size]))
    finally:
        runner.close()
    records = GateRecords(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.final_labels for p in parts]),
    )
    if path is not None and write_cache:
        buf = io.BytesIO()
        np.savez(buf, scores=records.scores, labels=records.labels, final_labels=records.final_labels)
        atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))
    return records, False
