"""``dgconvert bench --tune``: measure which runtime path each batch size takes on this
machine (:mod:`dgconvert.runtime.paths`) and store the choice in the bundle's manifest, so
runners read it instead of measuring when they are created."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dgconvert.bench.machine import machine_info
from dgconvert.core.bundle import Bundle
from dgconvert.runtime.paths import MANIFEST_KEY, PathChoice


def tune_paths(bundle: Bundle, images: np.ndarray, backend: str = "auto",
               backend_options: Mapping[str, Any] | None = None, calls: int = 15) -> PathChoice:
    """Measure the paths on ``images`` (median thresholds) and write the choice into
    ``bundle``'s manifest (atomically); returns it."""
    from dgconvert.runtime import GatedRunner

    runner = GatedRunner(bundle, backend=backend, paths="default", **dict(backend_options or {}))
    try:
        threads = getattr(runner.backend, "threads", None)
        cpu = machine_info().get("cpu", "?")
        choice = runner.measure_paths(images, calls=calls,
                                      source=f"bench --tune, {threads} threads, {cpu}")
    finally:
        runner.close()
    entry = choice.to_dict()
    bundle.update_manifest(lambda m: m.extra.__setitem__(MANIFEST_KEY, entry))
    return choice
