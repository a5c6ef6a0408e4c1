"""The backend interface: every backend runs one stage graph at a time."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.runtime.fast_paths import FastPath


@dataclass
class StageOutput:
    """What a stage hands back to the runner.

    ``features`` is opaque to the runner (a host array on CPU, a device buffer on a GPU)
    and only ever passed back to the same backend's next stage; ``score`` and ``label``
    are small host arrays, all the runner needs to decide the next ``keep``.
    """

    features: Any | None
    score: np.ndarray
    label: np.ndarray


class Backend(abc.ABC):
    """Runs a bundle's stage graphs. One instance per runner; safe to call from threads."""

    name: str = ""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @abc.abstractmethod
    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        """Run stage ``k``: images (``k == 0``) or the previous features gathered by ``keep``."""

    @abc.abstractmethod
    def run_full(self, images: np.ndarray) -> np.ndarray:
        """Logits of the ungated model (``full.onnx``) for float32 images."""

    def chain(self) -> Callable[[np.ndarray, np.ndarray], list[tuple[np.ndarray, ...]]] | None:
        """Optional fast path: ``run(images, rule)`` running every stage in one call,
        compaction inside, returning ``(score, label)`` per stage over the rows that reached
        it (a row of stage ``k`` continues where ``rule`` (an
        :class:`~dgconvert.core.exits.ExitRule`, or its thresholds) does not exit it). None
        when the backend only runs stage by stage."""
        return None

    def single(self) -> Callable[[np.ndarray, np.ndarray], tuple[Any, Any, int]] | None:
        """Optional fast path: ``run(image, thresholds) -> (score, label, exit stage)`` for
        one image in one call that runs only the stages it reaches (exit rule of
        :mod:`dgconvert.core.exits`). None when the backend has none."""
        return None

    def merge_features(self, parts: Sequence[tuple[Any, np.ndarray]]) -> Any | None:
        """One features handle holding ``features[keep]`` of every ``(features, keep)`` part,
        in order (rows of different batches of the same stage, for re-batching), or None
        when this backend cannot merge them. Default: host arrays."""
        if all(isinstance(f, np.ndarray) for f, _ in parts):
            return np.concatenate([f[keep] for f, keep in parts])
        return None

    def max_batch(self) -> int | None:
        """Largest batch a stage accepts (an engine profile's max), or None if unbounded."""
        return None

    def fast_paths(self) -> list[FastPath]:
        """The state of each fast path this backend has (none by default)."""
        return []

    def fast_paths_off(self) -> list[str]:
        """The fast paths this backend would use by default but could not, each with why
        (also logged as a warning when it happens)."""
        return [p.message for p in self.fast_paths() if p.unwanted_off]

    def describe(self) -> str:
        """One line saying what this backend runs on (providers, device, precision)."""
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions / device memory."""
