"""Torch-free input validation and normalization shared by the runtime and the torch side.

Images reach a bundle either as ``float32`` arrays that are already normalized (the
network's own input), or as ``uint8`` pixels that the manifest's normalization turns into
floats: ``((x / scale) - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dgconvert.core.errors import InputError


def make_normalizer(
    normalization: dict[str, Any] | None, channels: int, spatial_dims: int
) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``uint8 [N, C, ...] -> float32`` with the constants prepared once (the
    runtime's hot path calls it per batch)."""
    norm = normalization or {}
    extra = (1,) * spatial_dims
    ops: list[tuple[Any, np.ndarray]] = []
    scale = float(norm.get("scale", 1.0))
    if scale != 1.0:
        ops.append((np.divide, np.float32(scale)))
    for key, op in (("mean", np.subtract), ("std", np.divide)):
        vals = norm.get(key)
        if vals is None:
            continue
        v = np.asarray(vals, dtype=np.float32)
        if v.size not in (1, channels):
            raise InputError(
                f"normalization {key} has {v.size} values but the images have {channels} "
                "channels; expected 1 or one per channel. Fix the bundle's input.normalization."
            )
        ops.append((op, v.reshape((1, -1) + extra)))

    def apply(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        for fn, v in ops:
            fn(x, v, out=x)
        return x

    return apply


def normalize(images: np.ndarray, normalization: dict[str, Any] | None) -> np.ndarray:
    """Turn uint8 images ``[N, C, ...]`` into the network's float32 input."""
    c = images.shape[1] if images.ndim > 1 else 1
    return make_normalizer(normalization, c, max(images.ndim - 2, 0))(images)


def prepare_images(
    images: Any,
    sample_shape: Sequence[int],
    normalization: dict[str, Any] | None,
) -> np.ndarray:
    """Validate a batch against the bundle's input spec and return float32 ``[N, *shape]``.

    Accepts float32 (already normalized), uint8 (normalized here), and float64/float16
    (cast). A single sample without the batch dimension is refused (ambiguous).
    """
    if not isinstance(images, np.ndarray):
        if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor
            images = images.detach().cpu().numpy()
        else:
            images = np.asarray(images)
    expected = tuple(int(s) for s in sample_shape)
    if images.ndim == len(expected) + 1 and images.shape[0] == 0:
        return np.zeros((0,) + expected, dtype=np.float32)
    if images.ndim == len(expected) and len(expected) >= 2 and images.shape[0] != 0:
        # e.g. [N, 28, 28] for [1, 28, 28] grayscale: add the channel axis
        if expected[0] == 1 and tuple(images.shape[1:]) == expected[1:]:
            images = images[:, None]
    if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != expected:
        raise InputError(
            f"images have shape {tuple(images.shape)}, expected [N, {', '.join(map(str, expected))}] "
            "(N = batch size). Fix: reshape the batch, e.g. images.reshape(-1, "
            f"{', '.join(map(str, expected))})."
        )
    if images.dtype == np.uint8:
        return np.ascontiguousarray(normalize(images, normalization))
    if images.dtype.kind != "f":
        raise InputError(
            f"images have dtype {images.dtype}, expected float32 (normalized network input) "
            "or uint8 (raw pixels, normalized with the bundle's normalization). "
            "Fix: images.astype(np.float32) after normalizing, or pass uint8 pixels."
        )
    x = np.ascontiguousarray(images, dtype=np.float32)
    finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(
            f"{bad.size} image(s) contain NaN or Inf (rows {bad[:10].tolist()}"
            f"{'…' if bad.size > 10 else ''}); expected finite values. Fix: drop or repair "
            "those rows; they would otherwise be silently mislabelled."
        )
    return x
